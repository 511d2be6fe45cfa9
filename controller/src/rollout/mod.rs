//! Rollouts: creating them, and the reconciler that applies the pure engine's plans and persists them.

pub mod engine;
pub mod external;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::RolloutId;
use alki_shared::proto::{self, RolloutState, VariantPolicy, controller_message};
use alki_shared::schedule;

use crate::fleet::{Assignment, Fleet, selects};
use crate::insight::compare::Measurements;
use crate::registry::Registry;
use crate::store::{BenchmarkFilter, StoreError};

/// How often the reconciler looks even when nothing woke it (soak timers, deadlines).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("invalid rollout: {0}")]
    Invalid(String),
    #[error(
        "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
    )]
    BundleNotFound { repository: String, reference: String },
    #[error("device {device} is already in active rollout {rollout}; wait for it, or abort it first")]
    Conflict { device: String, rollout: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(String),
    /// An external registry could not be read or served wrong bytes; the message says which and what to check.
    #[error("{0}")]
    External(String),
}

/// Validates a spec, pins the candidate by digest, refuses overlaps with active rollouts, and stores
/// the new rollout as Pending. The reconciler takes it from there.
pub fn create(
    fleet: &Fleet,
    registry: &Registry,
    registry_host: &str,
    mut spec: proto::RolloutSpec,
    now_unix_ms: i64,
) -> Result<proto::Rollout, CreateError> {
    check_spec(&mut spec)?;
    let manifest = registry
        .resolve(&spec.repository, &spec.candidate)
        .map_err(|e| CreateError::Registry(e.to_string()))?
        .ok_or_else(|| CreateError::BundleNotFound {
            repository: spec.repository.clone(),
            reference: spec.candidate.clone(),
        })?;
    let tag = if spec.candidate.starts_with("sha256:") { String::new() } else { spec.candidate.clone() };
    let candidate = proto::BundleRef {
        registry: registry_host.to_owned(),
        repository: spec.repository.clone(),
        digest: manifest.digest.to_string(),
        tag,
    };
    create_pinned(fleet, spec, candidate, now_unix_ms)
}

/// Like [`create`] for a bundle in an external registry (`spec.repository` starts with a configured
/// registry's `host:port`): the tag is resolved there, the bytes are checked against the digest and the
/// manifest must be a bundle; agents are given that registry. Falls back to [`create`] for any other
/// repository, so the embedded registry's path is unchanged.
pub async fn create_any(
    fleet: &Fleet,
    registry: &Registry,
    registry_host: &str,
    externals: &[crate::config::ExternalRegistry],
    mut spec: proto::RolloutSpec,
    now_unix_ms: i64,
) -> Result<proto::Rollout, CreateError> {
    let Some((external, repository)) = external::split(externals, &spec.repository) else {
        return create(fleet, registry, registry_host, spec, now_unix_ms);
    };
    let (external, repository) = (external.clone(), repository.to_owned());
    check_spec(&mut spec)?;
    let (candidate, listed) = external::pin(&external, &repository, &spec.candidate).await?;
    let created = create_pinned(fleet, spec, candidate, now_unix_ms)?;
    fleet.store.record_external_bundle(listed)?;
    Ok(created)
}

fn check_spec(spec: &mut proto::RolloutSpec) -> Result<(), CreateError> {
    if spec.repository.is_empty() || spec.candidate.is_empty() {
        return Err(CreateError::Invalid("name the bundle's repository and its tag or digest".into()));
    }
    normalize_spec(spec).map_err(CreateError::Invalid)
}

/// Refuses overlaps with active rollouts and stores the rollout, pinned to `candidate`, as Pending.
fn create_pinned(
    fleet: &Fleet,
    spec: proto::RolloutSpec,
    candidate: proto::BundleRef,
    now_unix_ms: i64,
) -> Result<proto::Rollout, CreateError> {
    let digest = candidate.digest.clone();
    let _guard = fleet.rollouts_lock.lock().unwrap_or_else(|p| p.into_inner());
    let rollouts = fleet.store.rollouts()?;
    let active: Vec<&proto::Rollout> = rollouts.iter().filter(|r| is_active(r)).collect();
    for device in fleet.store.devices()? {
        if !selects(&spec.selector, &device.labels) {
            continue;
        }
        let overlapping = active.iter().find(|r| {
            r.spec.as_ref().is_some_and(|s| selects(&s.selector, &device.labels)) || r.id == device.rollout_id
        });
        if let Some(other) = overlapping {
            return Err(CreateError::Conflict { device: device.id, rollout: other.id.clone() });
        }
    }

    let rollout = proto::Rollout {
        id: RolloutId::generate().to_string(),
        candidate: Some(candidate),
        spec: Some(spec),
        state: RolloutState::Pending as i32,
        created_unix_ms: now_unix_ms,
        updated_unix_ms: now_unix_ms,
        message: "waiting for the reconciler".into(),
        ..Default::default()
    };
    let created = proto::RolloutEvent {
        rollout_id: rollout.id.clone(),
        seq: 1,
        unix_ms: now_unix_ms,
        kind: "created".into(),
        message: format!("created for {} with steps {:?}", digest, spec_percents(&rollout)),
        device_id: String::new(),
    };
    let rollout = proto::Rollout { event_seq: 1, ..rollout };
    fleet.store.commit_rollout(&rollout, &[], &[created])?;
    tracing::info!(rollout_id = %rollout.id, candidate = %digest, "Created a rollout.");
    fleet.changed.notify_one();
    Ok(rollout)
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

fn spec_percents(rollout: &proto::Rollout) -> Vec<u32> {
    rollout.spec.as_ref().map(|s| s.steps.iter().map(|s| s.percent).collect()).unwrap_or_default()
}

fn is_active(r: &proto::Rollout) -> bool {
    engine::is_active(RolloutState::try_from(r.state).unwrap_or(RolloutState::Unspecified))
}

/// Applies the engine's plans until shutdown: wakes on fleet changes and on a timer. The first pass also
/// looks at finished rollouts, to finish returning devices to A if the controller stopped mid-abort.
pub async fn reconcile_loop(fleet: Fleet, shutdown: Arc<tokio::sync::Notify>) {
    let mut first = true;
    loop {
        let pass = fleet.clone();
        let include_finished = std::mem::take(&mut first);
        // Store I/O is blocking; keep it off the async workers.
        let result =
            tokio::task::spawn_blocking(move || reconcile_once_with(&pass, crate::now_unix_ms(), include_finished))
                .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "Rollout reconciliation failed; retrying."),
            Err(error) => tracing::error!(%error, "Rollout reconciliation panicked; retrying."),
        }
        tokio::select! {
            _ = fleet.changed.notified() => {}
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = shutdown.notified() => return,
        }
    }
}

/// One pass over every active rollout. Idempotent: a pass over unchanged facts writes nothing.
pub fn reconcile_once(fleet: &Fleet, now_unix_ms: i64) -> Result<(), StoreError> {
    reconcile_once_with(fleet, now_unix_ms, false)
}

fn reconcile_once_with(fleet: &Fleet, now: i64, include_finished: bool) -> Result<(), StoreError> {
    let _guard = fleet.rollouts_lock.lock().unwrap_or_else(|p| p.into_inner());
    let rollouts = fleet.store.rollouts()?;
    let active_ids: HashSet<String> = rollouts.iter().filter(|r| is_active(r)).map(|r| r.id.clone()).collect();
    let considered: Vec<proto::Rollout> = rollouts
        .into_iter()
        .filter(|r| is_active(r) || (include_finished && r.state == RolloutState::Aborted as i32))
        .collect();
    if considered.is_empty() {
        return Ok(());
    }
    let mut devices = load_devices(fleet)?;
    // Measurements are read only when a rollout's performance gates need them.
    let measurements = if considered.iter().any(needs_measurements) {
        Measurements::from_records(&fleet.store.perf_records()?)
    } else {
        Measurements::default()
    };
    for mut rollout in considered {
        let span = tracing::info_span!("rollout", rollout_id = %rollout.id);
        let _entered = span.enter();
        let mut records = fleet.store.rollout_devices(&rollout.id)?;
        let mut others = active_ids.clone();
        others.remove(&rollout.id);
        // Zero-soak steps advance several times in one pass; bounded by the number of steps.
        let max_passes = rollout.spec.as_ref().map(|s| s.steps.len()).unwrap_or(0) + 2;
        for _ in 0..max_passes {
            let facts = engine::Facts {
                devices: &devices,
                records: &records,
                other_active: &others,
                measurements: &measurements,
            };
            let plan = engine::decide(&rollout, &facts, now);
            if !plan.changes(&rollout) {
                break;
            }
            let moved = plan.rollout.state != rollout.state || plan.rollout.current_step != rollout.current_step;
            apply(fleet, &rollout, &plan, now)?;
            merge_records(&mut records, &plan.records);
            rollout = plan.rollout;
            if !moved || !is_active(&rollout) {
                break;
            }
            devices = load_devices(fleet)?;
        }
    }
    Ok(())
}

/// Device records with `connected` filled from the live sessions (pre-staging only asks connected devices).
fn load_devices(fleet: &Fleet) -> Result<Vec<proto::Device>, StoreError> {
    let mut devices = fleet.store.devices()?;
    for d in &mut devices {
        d.connected = fleet.hub.is_connected(&d.id);
    }
    Ok(devices)
}

fn needs_measurements(r: &proto::Rollout) -> bool {
    let gates = r.spec.as_ref().and_then(|s| s.gates);
    is_active(r) && gates.is_some_and(|g| g.min_tokens_per_second_ratio.is_some() || g.max_ttft_ratio.is_some())
}

fn merge_records(records: &mut Vec<proto::RolloutDevice>, changed: &[proto::RolloutDevice]) {
    for c in changed {
        match records.iter_mut().find(|r| r.device_id == c.device_id) {
            Some(r) => *r = c.clone(),
            None => records.push(c.clone()),
        }
    }
}

/// Persists a plan (rollout, records and events in one transaction), then applies its device moves.
/// Persisting first means a crash in between is repaired by the next pass: records say what must hold.
fn apply(fleet: &Fleet, before: &proto::Rollout, plan: &engine::Plan, now: i64) -> Result<(), StoreError> {
    let mut rollout = plan.rollout.clone();
    if rollout != *before {
        rollout.updated_unix_ms = now;
    }
    if rollout != *before || !plan.records.is_empty() || !plan.events.is_empty() {
        fleet.store.commit_rollout(&rollout, &plan.records, &plan.events)?;
    }
    for event in &plan.events {
        tracing::info!(
            seq = event.seq,
            kind = %event.kind,
            device_id = %event.device_id,
            message = %event.message,
            "Rollout event."
        );
    }
    let Some(candidate) = &rollout.candidate else { return Ok(()) };
    if !plan.prestage.is_empty() {
        send_prestage(fleet, &rollout, candidate, &plan.prestage, now)?;
    }
    let to_b = Assignment {
        bundle: Some(candidate.clone()),
        runtime: rollout.spec.as_ref().and_then(|s| s.runtime).unwrap_or_default(),
        rollout_id: rollout.id.clone(),
        cohort: engine::COHORT_CANDIDATE.into(),
        variant_digest: String::new(),
    };
    let per_device: HashMap<String, Assignment> = if plan.to_candidate.is_empty() && plan.retry.is_empty() {
        HashMap::new()
    } else {
        let by_class = recommended_variants(fleet, &rollout)?;
        fleet
            .store
            .rollout_devices(&rollout.id)?
            .into_iter()
            .filter_map(|r| {
                let variant = by_class.get(&r.class)?;
                Some((r.device_id, Assignment { variant_digest: variant.clone(), ..to_b.clone() }))
            })
            .collect()
    };
    let to_b_of = |id: &str| per_device.get(id).unwrap_or(&to_b);
    let to_a: Vec<Assignment> = plan
        .to_baseline
        .iter()
        .map(|r| Assignment {
            bundle: r.bundle.clone(),
            runtime: r.runtime,
            rollout_id: rollout.id.clone(),
            cohort: engine::COHORT_BASELINE.into(),
            variant_digest: String::new(),
        })
        .collect();
    let mut moves: Vec<(&str, &Assignment, bool)> = Vec::new();
    moves.extend(plan.to_candidate.iter().map(|id| (id.as_str(), to_b_of(id), false)));
    moves.extend(plan.retry.iter().map(|id| (id.as_str(), to_b_of(id), true)));
    moves.extend(plan.to_baseline.iter().zip(&to_a).map(|(r, a)| (r.device_id.as_str(), a, false)));
    let sent = fleet.assign_many(&moves)?;
    if sent > 0 {
        tracing::info!(
            to_candidate = plan.to_candidate.len(),
            retried = plan.retry.len(),
            to_baseline = plan.to_baseline.len(),
            "Gave devices new desired states."
        );
    }
    Ok(())
}

/// Under the "recommended per class" variant policy, the candidate's variant per hardware class that has a
/// calibrated recommendation (class → variant digest). Classes without calibration data keep the device's
/// own choice; other policies give an empty map.
fn recommended_variants(fleet: &Fleet, rollout: &proto::Rollout) -> Result<HashMap<String, String>, StoreError> {
    let Some(spec) = rollout.spec.as_ref().filter(|s| s.variant_policy == VariantPolicy::RecommendedPerClass as i32)
    else {
        return Ok(HashMap::new());
    };
    let digest = rollout.candidate.as_ref().map(|c| c.digest.clone()).unwrap_or_default();
    let filter = BenchmarkFilter { bundle_digest: digest.clone(), ..Default::default() };
    let results = fleet.store.benchmarks(&filter, usize::MAX)?;
    Ok(match crate::insight::recommend::recommend(&digest, &results, &spec.variant_min_quantization) {
        Ok(recs) => {
            recs.into_iter().filter(|r| !r.variant_digest.is_empty()).map(|r| (r.class, r.variant_digest)).collect()
        }
        Err(error) => {
            tracing::warn!(%error, "No variant recommendation; devices choose their own variant.");
            HashMap::new()
        }
    })
}

/// Sends the plan's Prestage commands over the devices' sessions (the path benchmark commands take). Each
/// is recorded on its device (SENT, the attempt, when) before it leaves, so an answer arriving at once finds
/// it; a command that could not be delivered (the session just ended) is taken back and goes out on a
/// later pass once the device is connected again.
fn send_prestage(
    fleet: &Fleet,
    rollout: &proto::Rollout,
    candidate: &proto::BundleRef,
    orders: &[engine::PrestageOrder],
    now: i64,
) -> Result<(), StoreError> {
    let variants = recommended_variants(fleet, rollout)?;
    let commands: Vec<(proto::Command, proto::DevicePrestage)> = orders
        .iter()
        .map(|order| {
            let variant_digest = variants.get(&order.class).cloned().unwrap_or_default();
            let command_id = format!("prestage-{}", uuid::Uuid::new_v4().simple());
            let prestage = proto::Prestage { bundle: Some(candidate.clone()), variant_digest: variant_digest.clone() };
            let command =
                proto::Command { id: command_id.clone(), kind: Some(proto::command::Kind::Prestage(prestage)) };
            let record = proto::DevicePrestage {
                rollout_id: rollout.id.clone(),
                bundle: Some(candidate.clone()),
                variant_digest,
                command_id,
                state: proto::PrestageState::Sent as i32,
                attempts: order.attempt,
                sent_unix_ms: now,
                error: None,
                bytes_downloaded: 0,
            };
            (command, record)
        })
        .collect();
    let ids: Vec<&str> = orders.iter().map(|o| o.device_id.as_str()).collect();
    let previous = fleet.store.update_devices(&ids, |d, i| d.prestage.replace(commands[i].1.clone()))?;
    let mut undelivered: Vec<(&str, Option<proto::DevicePrestage>)> = Vec::new();
    for ((id, (command, _)), previous) in ids.iter().zip(commands).zip(previous) {
        let attempt = orders.iter().find(|o| o.device_id == *id).map(|o| o.attempt).unwrap_or(0);
        let command_id = command.id.clone();
        let delivered = fleet.hub.send(id, controller_message::Msg::Command(command));
        tracing::info!(device_id = %id, command_id, attempt, delivered, "Sent a prestage command.");
        if !delivered {
            undelivered.push((id, previous));
        }
    }
    if !undelivered.is_empty() {
        let ids: Vec<&str> = undelivered.iter().map(|(id, _)| *id).collect();
        fleet.store.update_devices(&ids, |d, i| d.prestage = undelivered[i].1.clone())?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error("rollout {0:?} does not exist; alkictl rollout list shows the rollouts")]
    NotFound(String),
    #[error(transparent)]
    Verb(#[from] engine::VerbError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies an operator's verb: the engine decides, this persists and applies, and the reconciler is woken.
pub fn operate(
    fleet: &Fleet,
    id: &str,
    verb: engine::Verb,
    reason: &str,
    now: i64,
) -> Result<proto::Rollout, OperateError> {
    let _guard = fleet.rollouts_lock.lock().unwrap_or_else(|p| p.into_inner());
    let rollout = fleet.store.rollout(id)?.ok_or_else(|| OperateError::NotFound(id.to_owned()))?;
    let records = fleet.store.rollout_devices(id)?;
    let plan = engine::command(&rollout, &records, verb, reason, now)?;
    let span = tracing::info_span!("rollout", rollout_id = %rollout.id);
    let _entered = span.enter();
    apply(fleet, &rollout, &plan, now)?;
    fleet.changed.notify_one();
    Ok(plan.rollout)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
