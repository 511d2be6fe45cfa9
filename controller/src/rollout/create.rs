//! Creating a rollout: the request's labels and spec checked (a ramp expanded into steps; quality gates
//! need an eval suite), the candidate's and the eval suite's signatures checked against the fleet's trusted
//! keys, or the checks overridden with a reason that is kept in the rollout's events, the candidate and the
//! suite pinned by digest in the embedded or an external registry (the suite checked to be one, within its
//! size caps), overlaps with active rollouts refused, and the rollout stored as Pending for the reconciler.

use std::sync::Arc;

use alki_shared::clock::UnixMs;
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, RolloutState};
use alki_shared::signing::PublicKey;

use super::Rollouts;
use super::external::{self, ExternalError};
use crate::config::ExternalRegistry;
use crate::facts::{rollout_is_active, selects};
use crate::registry::Registry;
use crate::store::{Keyed, StoreError};
use crate::suites::{self, SuiteError, SuiteSources};
use crate::trust::CandidateError;
use alki_shared::schedule;

/// Where candidates come from and what they must be signed with.
#[derive(Clone)]
pub struct Sources {
    pub registry: Arc<Registry>,
    /// host:port agents use to reach the embedded registry.
    pub registry_host: String,
    /// External registries rollouts may name (see `external`).
    pub externals: Arc<[ExternalRegistry]>,
    /// Keys a rollout candidate must be signed with (see `trust`).
    pub trusted_keys: Arc<[PublicKey]>,
    /// The external gates rollouts may name (see `gate_calls`).
    pub gates: Arc<crate::config::GatesConfig>,
}

/// An operator's request to create a rollout.
pub struct Request {
    pub spec: proto::RolloutSpec,
    /// Create it even when the candidate's signature check fails...
    pub override_signature_check: bool,
    /// ...for this reason, which must be given and is kept in the rollout's events.
    pub override_reason: String,
    /// Who asks (the audit log's and the events' name for them).
    pub by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("invalid rollout: {0}")]
    Invalid(String),
    /// The request itself is refused (labels, an override without a reason); the message says why.
    #[error("{0}")]
    Refused(String),
    /// The candidate's signature does not verify against the fleet's keys, or could not be read.
    #[error(transparent)]
    Signature(CandidateError),
    /// The eval suite cannot be pinned or is not a usable suite; the message says why.
    #[error(transparent)]
    Suite(#[from] SuiteError),
    #[error(
        "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
    )]
    BundleNotFound { repository: String, reference: String },
    #[error("device {device} is already in active rollout {rollout}; wait for it, or abort it first")]
    Conflict { device: DeviceId, rollout: RolloutId },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(String),
    /// An external registry could not be read or served wrong bytes; the message says which and what to check.
    #[error("{0}")]
    External(String),
    #[error("creating the rollout failed inside the controller: {0}")]
    Task(String),
}

impl From<ExternalError> for CreateError {
    fn from(e: ExternalError) -> CreateError {
        match e {
            ExternalError::NotFound { repository, reference } => CreateError::BundleNotFound { repository, reference },
            ExternalError::Invalid(why) => CreateError::Invalid(why),
            ExternalError::Unreachable(why) => CreateError::External(why),
        }
    }
}

/// Creates a rollout from an operator's request (see the module docs). The store is written on a blocking
/// thread, never on the async worker.
pub async fn create(
    rollouts: &Rollouts,
    sources: &Sources,
    request: Request,
    now: UnixMs,
) -> Result<proto::Rollout, CreateError> {
    let Request { mut spec, override_signature_check, override_reason, by } = request;
    crate::limits::check_labels("rollout selector", spec.selector.iter())
        .map_err(|e| CreateError::Refused(e.to_string()))?;
    check_quality(&spec).map_err(CreateError::Invalid)?;
    super::gate_calls::check_spec(&spec.external_gates, &sources.gates).map_err(CreateError::Invalid)?;
    let check =
        crate::trust::check_candidate(&sources.registry, &sources.externals, &sources.trusted_keys, &spec).await;
    let (suite, suite_check) = pin_suite(sources, &spec.eval_suite).await?;
    let overridden = signature_override([check.map(drop), suite_check], override_signature_check, &override_reason)?;
    let external = external::split(&sources.externals, &spec.repository).map(|(r, repo)| (r.clone(), repo.to_owned()));
    let pinned = match external {
        Some((registry, repository)) => {
            check_spec(&mut spec)?;
            Some(external::pin(&registry, &repository, &spec.candidate).await?)
        }
        None => None,
    };
    let (rollouts, sources) = (rollouts.clone(), sources.clone());
    let created = tokio::task::spawn_blocking(move || {
        let rollout = match pinned {
            Some(pinned) => {
                let rollout = create_pinned(&rollouts, spec, pinned.bundle.clone(), suite, now)?;
                rollouts.fleet.store.record_external_bundle(crate::bundles::pinned_external(&pinned, now))?;
                rollout
            }
            None => create_embedded(&rollouts, &sources, spec, suite, now)?,
        };
        if let Some(problem) = overridden {
            record_override(&rollouts, rollout.id(), &by, &override_reason, &problem, now)?;
        }
        Ok::<_, CreateError>(rollout.into_record())
    });
    created.await.map_err(|e| CreateError::Task(e.to_string()))?
}

/// The spec's eval suite pinned and checked to be a suite, with its signature check; none without one.
async fn pin_suite(
    sources: &Sources,
    reference: &str,
) -> Result<(Option<proto::BundleRef>, Result<(), CandidateError>), CreateError> {
    if reference.trim().is_empty() {
        return Ok((None, Ok(())));
    }
    let from = SuiteSources {
        registry: &sources.registry,
        registry_host: &sources.registry_host,
        externals: &sources.externals,
    };
    let suite = suites::pin(&from, reference).await?;
    let check = suites::check_signature(&from, &suite, &sources.trusted_keys).await;
    Ok((Some(suite), check))
}

/// The signature-override rule: a candidate or eval suite whose signature check fails is refused unless the
/// operator overrides the checks with a reason. Returns the problems overridden, if any.
fn signature_override(
    checks: impl IntoIterator<Item = Result<(), CandidateError>>,
    requested: bool,
    reason: &str,
) -> Result<Option<String>, CreateError> {
    let mut failed: Vec<CandidateError> = checks.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        return Ok(None);
    }
    if !requested {
        return Err(CreateError::Signature(failed.swap_remove(0)));
    }
    if reason.trim().is_empty() {
        return Err(CreateError::Refused(
            "overriding the signature check needs a reason (alkictl rollout create --reason \"...\"); it is \
             kept in the rollout's events"
                .into(),
        ));
    }
    Ok(Some(failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))
}

/// Pins the candidate in the embedded registry and stores the rollout. Blocking (the index and the store).
fn create_embedded(
    rollouts: &Rollouts,
    sources: &Sources,
    mut spec: proto::RolloutSpec,
    suite: Option<proto::BundleRef>,
    now: UnixMs,
) -> Result<Keyed<proto::Rollout>, CreateError> {
    check_spec(&mut spec)?;
    let candidate =
        crate::bundles::pin_embedded(&sources.registry, &sources.registry_host, &spec.repository, &spec.candidate)
            .map_err(|e| CreateError::Registry(e.to_string()))?
            .ok_or_else(|| CreateError::BundleNotFound {
                repository: spec.repository.clone(),
                reference: spec.candidate.clone(),
            })?;
    create_pinned(rollouts, spec, candidate, suite, now)
}

fn check_spec(spec: &mut proto::RolloutSpec) -> Result<(), CreateError> {
    if spec.repository.is_empty() || spec.candidate.is_empty() {
        return Err(CreateError::Invalid("name the bundle's repository and its tag or digest".into()));
    }
    normalize_spec(spec).map_err(CreateError::Invalid)
}

/// Refuses overlaps with active rollouts and stores the rollout, pinned to `candidate` (and its eval
/// suite), as Pending.
fn create_pinned(
    rollouts: &Rollouts,
    spec: proto::RolloutSpec,
    candidate: proto::BundleRef,
    eval_suite: Option<proto::BundleRef>,
    now: UnixMs,
) -> Result<Keyed<proto::Rollout>, CreateError> {
    let fleet = &rollouts.fleet;
    let digest = candidate.digest.clone();
    let _guard = rollouts.lock();
    refuse_overlaps(rollouts, &spec)?;
    let id = RolloutId::generate();
    let now = now.as_millis();
    let rollout = proto::Rollout {
        id: id.to_string(),
        candidate: Some(candidate),
        eval_suite,
        spec: Some(spec),
        state: RolloutState::Pending as i32,
        created_unix_ms: now,
        updated_unix_ms: now,
        message: "waiting for the reconciler".into(),
        ..Default::default()
    };
    let created = proto::RolloutEvent {
        rollout_id: rollout.id.clone(),
        seq: 1,
        unix_ms: now,
        kind: "created".into(),
        message: format!(
            "created for {} with steps {:?}{}",
            digest,
            spec_percents(&rollout),
            rollout.eval_suite.as_ref().map(|s| format!(", evaluated with suite {}", s.digest)).unwrap_or_default()
        ),
        device_id: String::new(),
    };
    let rollout = Keyed::with_id(id, proto::Rollout { event_seq: 1, ..rollout });
    fleet.store.commit_rollout(&rollout, &[], &[created])?;
    tracing::info!(rollout_id = %rollout.id(), candidate = %digest, "Created a rollout.");
    fleet.changed.notify_one();
    Ok(rollout)
}

/// A device the spec selects that an active rollout already selects (or moved) belongs to that rollout.
/// Called under the rollouts lock.
fn refuse_overlaps(rollouts: &Rollouts, spec: &proto::RolloutSpec) -> Result<(), CreateError> {
    let store = &rollouts.fleet.store;
    let all = store.rollouts()?;
    let active: Vec<&Keyed<proto::Rollout>> = all.iter().filter(|r| rollout_is_active(r.record())).collect();
    for keyed in store.devices()? {
        let device = keyed.record();
        if !selects(&spec.selector, &device.labels) {
            continue;
        }
        let overlapping = active.iter().find(|r| {
            r.record().spec.as_ref().is_some_and(|s| selects(&s.selector, &device.labels))
                || *r.id() == *device.rollout_id
        });
        if let Some(other) = overlapping {
            return Err(CreateError::Conflict { device: keyed.id().clone(), rollout: other.id().clone() });
        }
    }
    Ok(())
}

/// Appends a `signature_override` event to a just-created rollout: who overrode which problem, and why.
/// Under the rollouts lock, like every other change to a rollout, so sequence numbers stay dense.
fn record_override(
    rollouts: &Rollouts,
    rollout_id: &RolloutId,
    by: &str,
    reason: &str,
    problem: &str,
    now: UnixMs,
) -> Result<(), StoreError> {
    let store = &rollouts.fleet.store;
    let _guard = rollouts.lock();
    let Some(mut rollout) = store.rollout(rollout_id)? else { return Ok(()) };
    rollout.event_seq += 1;
    let event = proto::RolloutEvent {
        rollout_id: rollout_id.to_string(),
        seq: rollout.event_seq,
        unix_ms: now.as_millis(),
        kind: "signature_override".into(),
        message: format!("signature check overridden by {by}: {reason} (the check said: {problem})"),
        device_id: String::new(),
    };
    store.commit_rollout(&Keyed::with_id(rollout_id.clone(), rollout), &[], &[event])?;
    tracing::warn!(%rollout_id, by, reason, "Rollout created with its signature check overridden.");
    Ok(())
}

/// Expands an exponential ramp into steps, fills defaults and checks every field, naming the one at fault.
pub fn normalize_spec(spec: &mut proto::RolloutSpec) -> Result<(), String> {
    if let Some(window) = &mut spec.schedule {
        schedule::Window::new(window).map_err(|e| e.to_string())?;
        window.weekdays.sort_unstable();
    }
    if let Some(ramp) = spec.ramp {
        if !spec.steps.is_empty() {
            return Err("give either steps or a ramp, not both".into());
        }
        if !(1..=100).contains(&ramp.start_percent) {
            return Err(format!("ramp.start_percent {} must be from 1 to 100", ramp.start_percent));
        }
        if !(ramp.factor > 1.0 && ramp.factor.is_finite()) {
            return Err(format!("ramp.factor {} must be greater than 1 (e.g. 2 doubles each step)", ramp.factor));
        }
        let mut percent = f64::from(ramp.start_percent);
        while percent < 100.0 && spec.steps.len() < 100 {
            spec.steps.push(proto::RolloutStep { percent: percent as u32, min_soak_seconds: ramp.min_soak_seconds });
            percent *= ramp.factor;
        }
        spec.steps.push(proto::RolloutStep { percent: 100, min_soak_seconds: ramp.min_soak_seconds });
        spec.steps.dedup_by_key(|s| s.percent);
    }
    if spec.steps.is_empty() {
        spec.steps.push(proto::RolloutStep { percent: 100, min_soak_seconds: 0 });
    }
    let percents: Vec<u32> = spec.steps.iter().map(|s| s.percent).collect();
    if percents.iter().any(|p| !(1..=100).contains(p)) || percents.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("steps {percents:?} must be percentages from 1 to 100 that never decrease"));
    }
    if percents.last() != Some(&100) {
        return Err(format!("the last step must be 100%, not {:?}", percents.last()));
    }
    if let Some(g) = &spec.gates {
        for (name, value) in
            [("gates.min_success_ratio", g.min_success_ratio), ("gates.max_failure_ratio", g.max_failure_ratio)]
        {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(format!("{name} {v} must be a ratio from 0 to 1"));
            }
        }
        for (name, value) in [
            ("gates.min_tokens_per_second_ratio", g.min_tokens_per_second_ratio),
            ("gates.max_ttft_ratio", g.max_ttft_ratio),
        ] {
            if let Some(v) = value
                && !(v > 0.0 && v.is_finite())
            {
                return Err(format!("{name} {v} must be a positive ratio relative to A (e.g. 0.9)"));
            }
        }
    }
    Ok(())
}

/// The quality thresholds: each in range (`QualityGates::validate`), none without an eval suite to measure
/// it, the error-rate and p95 latency ratios positive, and a variant quality floor only for the recommended-variant policy.
pub fn check_quality(spec: &proto::RolloutSpec) -> Result<(), String> {
    let no_suite = spec.eval_suite.trim().is_empty();
    if let Some(g) = &spec.gates {
        let gates = crate::insight::quality::rollout_gates(g);
        gates.validate().map_err(|e| format!("gates: {e}"))?;
        if !gates.is_empty() && no_suite {
            return Err("quality gates (max_kld, min_top1_agreement, max_perplexity_ratio, min_golden_pass) are \
                        measured with an eval suite: name one in eval_suite (alkictl rollout create --eval-suite \
                        REPO:TAG), or drop the quality gates"
                .into());
        }
        if let Some(v) = g.max_error_rate_ratio
            && !(v > 0.0 && v.is_finite())
        {
            return Err(format!(
                "gates.max_error_rate_ratio {v} must be a positive ratio relative to A's error rate (e.g. 1.5)"
            ));
        }
        if let Some(v) = g.max_p95_latency_ratio
            && !(v > 0.0 && v.is_finite())
        {
            return Err(format!(
                "gates.max_p95_latency_ratio {v} must be a positive ratio relative to A's p95 latency (e.g. 1.5 \
                 for at most 50% slower)"
            ));
        }
    }
    if let Some(floor) = &spec.variant_quality_floor {
        let gates = crate::insight::quality::floor_gates(floor);
        gates.validate().map_err(|e| format!("variant_quality_floor: {e}"))?;
        if !gates.is_empty() && spec.variant_policy != proto::VariantPolicy::RecommendedPerClass as i32 {
            return Err("variant_quality_floor applies to the recommended-per-class variant policy; set \
                        variant_policy to it, or drop the floor"
                .into());
        }
        if !gates.is_empty() && no_suite {
            return Err("variant_quality_floor is measured with an eval suite (calibration evaluations): name \
                        it in eval_suite"
                .into());
        }
    }
    Ok(())
}

fn spec_percents(rollout: &proto::Rollout) -> Vec<u32> {
    rollout.spec.as_ref().map(|s| s.steps.iter().map(|s| s.percent).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_signature_check_is_refused_unless_overridden_with_a_reason() {
        let failed = || {
            Err(CandidateError::Read {
                what: crate::trust::Artifact::Bundle,
                repository: "acme/qwen".into(),
                digest: alki_shared::digest::Digest::of(b""),
                reason: "registry down".into(),
            })
        };
        assert!(matches!(signature_override([Ok(()), Ok(())], true, ""), Ok(None)), "nothing to override");
        assert!(matches!(signature_override([Ok(()), failed()], false, "hotfix"), Err(CreateError::Signature(_))));
        assert!(matches!(signature_override([failed()], true, "  "), Err(CreateError::Refused(_))), "a reason");
        let overridden = signature_override([failed(), failed()], true, "hotfix").ok().flatten().unwrap_or_default();
        assert!(overridden.contains("registry down"), "the problem is kept for the event: {overridden}");
        assert_eq!(overridden.matches("registry down").count(), 2, "the candidate's and the suite's");
    }

    #[test]
    fn a_schedule_window_is_validated_and_its_weekdays_sorted() {
        let window = |start, end, weekdays: &[u32]| proto::RolloutSpec {
            schedule: Some(proto::ScheduleWindow {
                start_minute_utc: start,
                end_minute_utc: end,
                weekdays: weekdays.to_vec(),
            }),
            ..Default::default()
        };
        let mut spec = window(22 * 60, 120, &[5, 1]);
        normalize_spec(&mut spec).expect("a window spanning midnight");
        assert_eq!(spec.schedule.map(|w| w.weekdays), Some(vec![1, 5]));
        assert!(normalize_spec(&mut window(60, 60, &[])).expect_err("empty").contains("same minute"));
        assert!(normalize_spec(&mut window(60, 1440, &[])).expect_err("minute").contains("end_minute_utc 1440"));
        assert!(normalize_spec(&mut window(60, 120, &[9])).expect_err("weekday").contains("9"));
        assert!(normalize_spec(&mut window(60, 120, &[2, 2])).expect_err("twice").contains("twice"));
    }

    #[test]
    fn a_ramp_expands_into_steps_and_bad_fields_are_named() {
        let mut spec = proto::RolloutSpec {
            ramp: Some(proto::ExponentialRamp { start_percent: 1, factor: 2.0, min_soak_seconds: 60 }),
            ..Default::default()
        };
        normalize_spec(&mut spec).expect("valid ramp");
        let percents: Vec<u32> = spec.steps.iter().map(|s| s.percent).collect();
        assert_eq!(percents, [1, 2, 4, 8, 16, 32, 64, 100]);
        assert!(spec.steps.iter().all(|s| s.min_soak_seconds == 60));

        let mut spec = proto::RolloutSpec {
            ramp: Some(proto::ExponentialRamp { start_percent: 5, factor: 1.0, min_soak_seconds: 0 }),
            ..Default::default()
        };
        assert!(normalize_spec(&mut spec).expect_err("factor 1").contains("ramp.factor"));
        let mut spec = proto::RolloutSpec {
            gates: Some(proto::RolloutGates { max_failure_ratio: Some(5.0), ..Default::default() }),
            ..Default::default()
        };
        assert!(normalize_spec(&mut spec).expect_err("ratio 5").contains("gates.max_failure_ratio"));
        let mut spec = proto::RolloutSpec {
            steps: vec![proto::RolloutStep { percent: 50, min_soak_seconds: 0 }],
            ..Default::default()
        };
        assert!(normalize_spec(&mut spec).expect_err("no 100%").contains("last step must be 100%"));
    }

    #[test]
    fn quality_gates_need_a_suite_and_thresholds_in_range() {
        let spec = |gates: proto::RolloutGates, suite: &str| proto::RolloutSpec {
            gates: Some(gates),
            eval_suite: suite.into(),
            ..Default::default()
        };
        let kld = proto::RolloutGates { max_kld: Some(0.05), ..Default::default() };
        assert_eq!(check_quality(&spec(kld, "acme/suite:v1")), Ok(()));
        assert!(check_quality(&spec(kld, "")).expect_err("no suite").contains("measured with an eval suite"));
        let bad = proto::RolloutGates { min_top1_agreement: Some(90.0), ..Default::default() };
        assert!(check_quality(&spec(bad, "acme/suite:v1")).expect_err("range").contains("--min-top1-agreement"));
        let errors = proto::RolloutGates { max_error_rate_ratio: Some(0.0), ..Default::default() };
        assert!(check_quality(&spec(errors, "")).expect_err("ratio").contains("max_error_rate_ratio"));
        let errors = proto::RolloutGates { max_error_rate_ratio: Some(1.5), ..Default::default() };
        assert_eq!(check_quality(&spec(errors, "")), Ok(()), "the error-rate gate reads telemetry, not a suite");
        for bad in [0.0, -2.0, f64::INFINITY, f64::NAN] {
            let latency = proto::RolloutGates { max_p95_latency_ratio: Some(bad), ..Default::default() };
            let err = check_quality(&spec(latency, "")).expect_err("ratio");
            assert!(err.starts_with(&format!("gates.max_p95_latency_ratio {bad} must be a positive ratio")), "{err}");
        }
        let latency = proto::RolloutGates { max_p95_latency_ratio: Some(1.5), ..Default::default() };
        assert_eq!(check_quality(&spec(latency, "")), Ok(()), "the p95 latency gate reads telemetry, not a suite");
        let floor = proto::RolloutSpec {
            variant_quality_floor: Some(proto::QualityFloor { max_kld: Some(0.05), ..Default::default() }),
            eval_suite: "acme/suite:v1".into(),
            ..Default::default()
        };
        assert!(check_quality(&floor).expect_err("policy").contains("recommended-per-class"));
        let floor = proto::RolloutSpec { variant_policy: proto::VariantPolicy::RecommendedPerClass as i32, ..floor };
        assert_eq!(check_quality(&floor), Ok(()));
        let floor = proto::RolloutSpec { eval_suite: String::new(), ..floor };
        assert!(check_quality(&floor).expect_err("suite").contains("eval_suite"));
    }
}
