//! The reconciler: applies the engine's plans and persists them. Each plan (rollout, per-device records
//! with each device's baseline A, events) is committed in one transaction before any device moves, so a
//! restart resumes exactly where it was; then devices get their desired states, in one transaction, and
//! Prestage commands go out over their sessions. Operators' verbs take the same path ([`operate`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::clock::{SharedClock, UnixMs};
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, RolloutState, VariantPolicy, controller_message};

use super::Rollouts;
use super::engine;
use super::gate_calls::GateCalls;
use crate::facts::rollout_is_active;
use crate::fleet::{Assignment, EvalAssignment, Fleet};
use crate::insight::compare::Measurements;
use crate::insight::quality::{self, Evaluations};
use crate::insight::recommend::{self, QualityFloor};
use crate::store::{BenchmarkFilter, Keyed, StoreError};

/// How often the reconciler looks even when nothing woke it (soak timers, deadlines).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Applies the engine's plans until shutdown: wakes on fleet changes and on a timer. The first pass also
/// looks at finished rollouts, to finish returning devices to A if the controller stopped mid-abort.
pub async fn reconcile_loop(
    rollouts: Rollouts,
    gates: Arc<GateCalls>,
    clock: SharedClock,
    shutdown: Arc<tokio::sync::Notify>,
) {
    let mut first = true;
    loop {
        let (pass, now) = (rollouts.clone(), clock.now());
        let include_finished = std::mem::take(&mut first);
        // Store I/O is blocking; keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || reconcile_once_with(&pass, now, include_finished)).await;
        match result {
            Ok(Ok(asks)) => {
                for (rollout, asks) in asks {
                    gates.ask(&rollout, asks);
                }
            }
            Ok(Err(error)) => tracing::error!(%error, "Rollout reconciliation failed; retrying."),
            Err(error) => tracing::error!(%error, "Rollout reconciliation panicked; retrying."),
        }
        tokio::select! {
            _ = rollouts.fleet.changed.notified() => {}
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = shutdown.notified() => return,
        }
    }
}

/// One pass over every active rollout. Idempotent: a pass over unchanged facts writes nothing.
pub fn reconcile_once(rollouts: &Rollouts, now: UnixMs) -> Result<(), StoreError> {
    reconcile_once_with(rollouts, now, false).map(drop)
}

/// External gates to ask, per rollout (as it was committed).
type GateAsks = Vec<(Keyed<proto::Rollout>, Vec<engine::external_gates::Ask>)>;

fn reconcile_once_with(rollouts: &Rollouts, now: UnixMs, include_finished: bool) -> Result<GateAsks, StoreError> {
    let fleet = &rollouts.fleet;
    let _guard = rollouts.lock();
    let stored = fleet.store.rollouts()?;
    let active_ids: HashSet<RolloutId> =
        stored.iter().filter(|r| rollout_is_active(r.record())).map(|r| r.id().clone()).collect();
    let considered: Vec<Keyed<proto::Rollout>> = stored
        .into_iter()
        .filter(|r| {
            let r = r.record();
            rollout_is_active(r) || (include_finished && r.state == RolloutState::Aborted as i32)
        })
        .collect();
    let mut asks = GateAsks::new();
    if considered.is_empty() {
        return Ok(asks);
    }
    let mut devices = load_devices(fleet)?;
    // Measurements are read only when a rollout's performance gates need them.
    let measurements = if considered.iter().any(|r| needs_measurements(r.record())) {
        Measurements::from_records(&fleet.store.perf_records()?)
    } else {
        Measurements::default()
    };
    for mut rollout in considered {
        let span = tracing::info_span!("rollout", rollout_id = %rollout.id());
        let _entered = span.enter();
        let mut records = fleet.store.rollout_devices(rollout.id())?;
        let evaluations = evaluations_of(fleet, rollout.record())?;
        let mut others = active_ids.clone();
        others.remove(rollout.id());
        // Zero-soak steps advance several times in one pass; bounded by the number of steps.
        let max_passes = rollout.record().spec.as_ref().map(|s| s.steps.len()).unwrap_or(0) + 2;
        for _ in 0..max_passes {
            let facts = engine::Facts {
                devices: &devices,
                records: &records,
                other_active: &others,
                measurements: &measurements,
                evaluations: &evaluations,
            };
            let plan = engine::decide(&rollout, &facts, now);
            let before = rollout.record();
            if !plan.changes(before) {
                if !plan.external_asks.is_empty() {
                    asks.push((rollout.clone(), plan.external_asks));
                }
                break;
            }
            let moved = plan.rollout.state != before.state || plan.rollout.current_step != before.current_step;
            apply(fleet, &rollout, &plan, now)?;
            merge_records(&mut records, &plan.records);
            rollout = Keyed::with_id(rollout.id().clone(), plan.rollout);
            if !plan.external_asks.is_empty() {
                asks.push((rollout.clone(), plan.external_asks));
            }
            if !moved || !rollout_is_active(rollout.record()) {
                break;
            }
            devices = load_devices(fleet)?;
        }
    }
    Ok(asks)
}

/// Device records with `connected` filled from the live sessions (pre-staging only asks connected devices).
fn load_devices(fleet: &Fleet) -> Result<Vec<Keyed<proto::Device>>, StoreError> {
    let mut devices = fleet.store.devices()?;
    for d in &mut devices {
        let connected = fleet.hub.is_connected(d.id().as_str());
        d.record_mut().connected = connected;
    }
    Ok(devices)
}

fn needs_measurements(r: &proto::Rollout) -> bool {
    let gates = r.spec.as_ref().and_then(|s| s.gates);
    rollout_is_active(r)
        && gates.is_some_and(|g| {
            g.min_tokens_per_second_ratio.is_some()
                || g.max_ttft_ratio.is_some()
                || g.max_error_rate_ratio.is_some()
                || g.max_p95_latency_ratio.is_some()
        })
}

/// The devices' evaluations of an active rollout's candidate with its eval suite (none without a suite).
fn evaluations_of(fleet: &Fleet, rollout: &proto::Rollout) -> Result<Evaluations, StoreError> {
    match (&rollout.candidate, &rollout.eval_suite) {
        (Some(candidate), Some(suite)) if rollout_is_active(rollout) => {
            Ok(Evaluations::from_samples(fleet.store.eval_samples(&candidate.digest, &suite.digest)?))
        }
        _ => Ok(Evaluations::default()),
    }
}

fn merge_records(records: &mut Vec<Keyed<proto::RolloutDevice>>, changed: &[Keyed<proto::RolloutDevice>]) {
    for c in changed {
        match records.iter_mut().find(|r| r.id() == c.id()) {
            Some(r) => *r = c.clone(),
            None => records.push(c.clone()),
        }
    }
}

/// Persists a plan (rollout, records and events in one transaction), then applies its device moves.
/// Persisting first means a crash in between is repaired by the next pass: records say what must hold.
fn apply(fleet: &Fleet, before: &Keyed<proto::Rollout>, plan: &engine::Plan, now: UnixMs) -> Result<(), StoreError> {
    let rollout_id = before.id();
    let mut rollout = plan.rollout.clone();
    let changed = rollout != *before.record();
    if changed {
        rollout.updated_unix_ms = now.as_millis();
    }
    let rollout = Keyed::with_id(rollout_id.clone(), rollout);
    if changed || !plan.records.is_empty() || !plan.events.is_empty() {
        fleet.store.commit_rollout(&rollout, &plan.records, &plan.events)?;
    }
    let rollout = rollout.record();
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
        send_prestage(fleet, rollout, candidate, &plan.prestage, now)?;
    }
    let to_b = Assignment {
        bundle: Some(candidate.clone()),
        runtime: rollout.spec.as_ref().and_then(|s| s.runtime).unwrap_or_default(),
        rollout_id: rollout_id.clone(),
        cohort: engine::COHORT_CANDIDATE.into(),
        variant_digest: String::new(),
        eval: None,
    };
    let per_device: HashMap<DeviceId, Assignment> = if plan.to_candidate.is_empty() && plan.retry.is_empty() {
        HashMap::new()
    } else {
        // Each B device: its class's recommended variant, and its evaluation against its own baseline.
        let by_class = recommended_variants(fleet, rollout)?;
        fleet
            .store
            .rollout_devices(rollout_id)?
            .into_iter()
            .map(|keyed| {
                let r = keyed.record();
                let eval = rollout.eval_suite.clone().map(|suite| EvalAssignment {
                    suite,
                    baseline: r.baseline.clone(),
                    baseline_variant: r.baseline_variant.clone(),
                });
                let variant_digest = by_class.get(&r.class).cloned().unwrap_or_default();
                (keyed.id().clone(), Assignment { variant_digest, eval, ..to_b.clone() })
            })
            .collect()
    };
    let to_b_of = |id: &DeviceId| per_device.get(id).unwrap_or(&to_b);
    let to_a: Vec<Assignment> = plan
        .to_baseline
        .iter()
        .map(|r| Assignment {
            bundle: r.bundle.clone(),
            runtime: r.runtime,
            rollout_id: rollout_id.clone(),
            cohort: engine::COHORT_BASELINE.into(),
            variant_digest: String::new(),
            eval: None,
        })
        .collect();
    let mut moves: Vec<(&DeviceId, &Assignment, bool)> = Vec::new();
    moves.extend(plan.to_candidate.iter().map(|id| (id, to_b_of(id), false)));
    moves.extend(plan.retry.iter().map(|id| (id, to_b_of(id), true)));
    moves.extend(plan.to_baseline.iter().zip(&to_a).map(|(r, a)| (&r.device_id, a, false)));
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
/// calibrated recommendation (class → variant digest), within `variant_quality_floor` when one is set (as
/// `Recommend` with a floor: measured with the rollout's eval suite), else at or above
/// `variant_min_quantization`. Classes without a recommendation keep the device's own choice; other
/// policies give an empty map.
fn recommended_variants(fleet: &Fleet, rollout: &proto::Rollout) -> Result<HashMap<String, String>, StoreError> {
    let Some(spec) = rollout.spec.as_ref().filter(|s| s.variant_policy == VariantPolicy::RecommendedPerClass as i32)
    else {
        return Ok(HashMap::new());
    };
    let digest = rollout.candidate.as_ref().map(|c| c.digest.clone()).unwrap_or_default();
    let filter = BenchmarkFilter { bundle_digest: digest.clone(), ..Default::default() };
    let results = fleet.store.benchmarks(&filter, usize::MAX)?;
    let gates = spec.variant_quality_floor.as_ref().map(quality::floor_gates).filter(|g| !g.is_empty());
    let evaluations = match (&gates, &rollout.eval_suite) {
        (Some(_), Some(suite)) => Evaluations::from_samples(fleet.store.eval_samples(&digest, &suite.digest)?),
        _ => Evaluations::default(),
    };
    let floor = gates.map(|gates| QualityFloor { gates, evaluations: &evaluations });
    let recommended = recommend::recommend(&digest, &results, &spec.variant_min_quantization, floor.as_ref());
    Ok(match recommended {
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
    now: UnixMs,
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
                sent_unix_ms: now.as_millis(),
                error: None,
                bytes_downloaded: 0,
            };
            (command, record)
        })
        .collect();
    let ids: Vec<&DeviceId> = orders.iter().map(|o| &o.device_id).collect();
    let previous = fleet.store.update_devices(&ids, |d, i| d.prestage.replace(commands[i].1.clone()))?;
    let mut undelivered: Vec<(&DeviceId, Option<proto::DevicePrestage>)> = Vec::new();
    for ((order, (command, _)), previous) in orders.iter().zip(commands).zip(previous) {
        let (id, attempt) = (&order.device_id, order.attempt);
        let command_id = command.id.clone();
        let delivered = fleet.hub.send(id.as_str(), controller_message::Msg::Command(command));
        tracing::info!(device_id = %id, command_id, attempt, delivered, "Sent a prestage command.");
        if !delivered {
            undelivered.push((id, previous));
        }
    }
    if !undelivered.is_empty() {
        let ids: Vec<&DeviceId> = undelivered.iter().map(|(id, _)| *id).collect();
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
/// Blocking (the store).
/// An operator's verb on the rollout an API call names by id, applied for `by` (the caller's name): an id
/// that does not parse names no rollout, and an empty reason records who applied it.
pub fn operate_by(
    rollouts: &Rollouts,
    id: &str,
    verb: engine::Verb,
    reason: &str,
    by: &str,
    now: UnixMs,
) -> Result<proto::Rollout, OperateError> {
    let id = RolloutId::new(id).map_err(|_| OperateError::NotFound(id.to_owned()))?;
    let reason = if reason.is_empty() { format!("by {by}") } else { reason.to_owned() };
    let rollout = operate(rollouts, &id, verb, &reason, now)?;
    tracing::info!(rollout_id = %rollout.id, verb = verb.label(), by, "Rollout verb applied.");
    Ok(rollout)
}

pub fn operate(
    rollouts: &Rollouts,
    id: &RolloutId,
    verb: engine::Verb,
    reason: &str,
    now: UnixMs,
) -> Result<proto::Rollout, OperateError> {
    let fleet = &rollouts.fleet;
    let _guard = rollouts.lock();
    let rollout = fleet.store.rollout(id)?.ok_or_else(|| OperateError::NotFound(id.to_string()))?;
    let rollout = Keyed::with_id(id.clone(), rollout);
    let records = fleet.store.rollout_devices(id)?;
    let plan = engine::command(&rollout, &records, verb, reason, now)?;
    let span = tracing::info_span!("rollout", rollout_id = %id);
    let _entered = span.enter();
    apply(fleet, &rollout, &plan, now)?;
    fleet.changed.notify_one();
    Ok(plan.rollout)
}
