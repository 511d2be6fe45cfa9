//! What the gRPC InsightService and the dashboard's HTTP API ask: a rollout's comparison (speed and
//! quality), stored benchmarks and evaluations, recommendations, and benchmark, calibration and evaluation
//! commands to devices. Both front doors call these, so they
//! answer with the same data.

use std::collections::HashMap;

use alki_shared::clock::UnixMs;
use alki_shared::eval::quality::QualityGates;
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, controller_message::Msg};

use super::compare::{self, Measurements};
use super::quality::{self, Evaluations};
use super::recommend::{self, QualityFloor, RecommendError};
use crate::facts::selects;
use crate::fleet::Fleet;
use crate::fleet::commands::queueable;
use crate::scope::remember_commanded;
use crate::store::{BenchmarkFilter, EvaluationFilter, Keyed, StoreError, StoredEvaluation};

/// Most benchmark results one answer carries.
pub const MAX_BENCHMARKS: usize = 1000;
/// Most evaluations one answer carries.
pub const MAX_EVALUATIONS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("rollout {0:?} does not exist; alkictl rollout list shows the rollouts")]
    RolloutNotFound(String),
    #[error("name devices by id or give a label selector (an empty selector would target the whole fleet)")]
    NoTargets,
    #[error("device {0:?} is not known to this controller")]
    DeviceNotFound(String),
    #[error(transparent)]
    Recommend(#[from] RecommendError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rollout's A/B comparison per hardware class, with the sample floor its gates use, and B's quality
/// against A per class when the rollout has an eval suite.
pub fn comparison(fleet: &Fleet, rollout_id: &RolloutId) -> Result<proto::Comparison, QueryError> {
    let rollout =
        fleet.store.rollout(rollout_id)?.ok_or_else(|| QueryError::RolloutNotFound(rollout_id.to_string()))?;
    let records: Vec<proto::RolloutDevice> =
        fleet.store.rollout_devices(rollout_id)?.into_iter().map(Keyed::into_record).collect();
    let devices = fleet.store.device_summaries()?;
    let measurements = Measurements::from_records(&fleet.store.perf_records()?);
    let min = rollout.spec.as_ref().and_then(|s| s.gates).map(|g| g.min_devices).unwrap_or(0).max(1) as usize;
    let mut comparison = compare::compare(&rollout, &devices, &records, &measurements, min);
    if let (Some(candidate), Some(suite)) = (&rollout.candidate, &rollout.eval_suite) {
        let evaluations = Evaluations::from_samples(fleet.store.eval_samples(&candidate.digest, &suite.digest)?);
        quality::fill_comparison(&mut comparison, &records, &evaluations);
    }
    Ok(comparison)
}

/// Stored evaluations matching `filter`, newest first (`limit` 0: [`MAX_EVALUATIONS`]).
pub fn evaluations(fleet: &Fleet, filter: &EvaluationFilter, limit: u32) -> Result<Vec<proto::Evaluation>, QueryError> {
    let limit = if limit == 0 { MAX_EVALUATIONS } else { (limit as usize).min(MAX_EVALUATIONS) };
    Ok(fleet.store.evaluations(filter, limit)?.iter().map(StoredEvaluation::to_proto).collect())
}

pub fn benchmarks(
    fleet: &Fleet,
    filter: &BenchmarkFilter,
    limit: u32,
) -> Result<Vec<proto::BenchmarkResult>, QueryError> {
    let limit = if limit == 0 { MAX_BENCHMARKS } else { (limit as usize).min(MAX_BENCHMARKS) };
    Ok(fleet.store.benchmarks(filter, limit)?)
}

/// Per-class recommendation for a bundle digest from every stored benchmark of it: at or above
/// `min_quantization`, or, with `floor` (thresholds and the suite digest they are measured with), within it.
pub fn recommendation(
    fleet: &Fleet,
    bundle_digest: &str,
    min_quantization: &str,
    floor: Option<(QualityGates, &str)>,
) -> Result<Vec<proto::ClassRecommendation>, QueryError> {
    let filter = BenchmarkFilter { bundle_digest: bundle_digest.to_owned(), ..Default::default() };
    let results = fleet.store.benchmarks(&filter, usize::MAX)?;
    let Some((gates, suite_digest)) = floor else {
        return Ok(recommend::recommend(bundle_digest, &results, min_quantization, None)?);
    };
    let evaluations = Evaluations::from_samples(fleet.store.eval_samples(bundle_digest, suite_digest)?);
    let floor = QualityFloor { gates, evaluations: &evaluations };
    Ok(recommend::recommend(bundle_digest, &results, min_quantization, Some(&floor))?)
}

/// The devices a command targets: the named ones (each must exist), else those the selector picks.
pub fn targets(
    fleet: &Fleet,
    device_ids: &[String],
    selector: &HashMap<String, String>,
) -> Result<Vec<DeviceId>, QueryError> {
    if device_ids.is_empty() && selector.is_empty() {
        return Err(QueryError::NoTargets);
    }
    if !device_ids.is_empty() {
        let mut named = Vec::with_capacity(device_ids.len());
        for id in device_ids {
            // An id that does not parse names no device this controller knows.
            let not_found = || QueryError::DeviceNotFound(id.clone());
            let device_id = DeviceId::new(id.clone()).map_err(|_| not_found())?;
            fleet.store.device(&device_id)?.ok_or_else(not_found)?;
            named.push(device_id);
        }
        return Ok(named);
    }
    let devices = fleet.store.devices()?;
    Ok(devices.into_iter().filter(|d| selects(selector, &d.record().labels)).map(|d| d.id().clone()).collect())
}

/// Records on each target device the bundles and eval suite `kind` names, so its registry token may read them
/// (`crate::scope`), before the command is sent. Blocking.
pub fn grant_command_bundles(
    fleet: &Fleet,
    devices: &[DeviceId],
    kind: &proto::command::Kind,
) -> Result<(), StoreError> {
    let bundles: Vec<proto::BundleRef> = match kind {
        proto::command::Kind::Calibrate(c) => c.bundle.iter().chain(&c.suite).cloned().collect(),
        proto::command::Kind::Evaluate(e) => e.bundle.iter().chain(&e.suite).chain(&e.baseline).cloned().collect(),
        proto::command::Kind::Prestage(p) => p.bundle.iter().cloned().collect(),
        _ => Vec::new(),
    };
    if bundles.is_empty() || devices.is_empty() {
        return Ok(());
    }
    let ids: Vec<&DeviceId> = devices.iter().collect();
    fleet.store.update_devices(&ids, |d, _| remember_commanded(d, &bundles))?;
    Ok(())
}

/// Sends one command per device over its session. A device not connected now gets it queued
/// (`crate::fleet::commands`: bounded per device, until it expires) when the kind waits for offline devices,
/// and is reported neither delivered nor queued otherwise, with the reason. Blocking (queueing writes the
/// store).
pub fn send_commands(
    fleet: &Fleet,
    devices: &[DeviceId],
    kind: &proto::command::Kind,
    now: UnixMs,
) -> Vec<proto::SentCommand> {
    devices.iter().map(|device_id| send_command(fleet, device_id, kind, now)).collect()
}

/// One command to one device: sent, queued, or neither with the reason.
pub fn send_command(
    fleet: &Fleet,
    device_id: &DeviceId,
    kind: &proto::command::Kind,
    now: UnixMs,
) -> proto::SentCommand {
    let command_id = format!("cmd-{}", uuid::Uuid::new_v4().simple());
    let command = proto::Command { id: command_id.clone(), kind: Some(kind.clone()) };
    let mut sent = proto::SentCommand { device_id: device_id.to_string(), command_id, ..Default::default() };
    sent.delivered = fleet.hub.send(device_id.as_str(), Msg::Command(command.clone()));
    if !sent.delivered {
        if queueable(kind) {
            match fleet.commands.enqueue(&fleet.store, device_id, command, now) {
                Ok(expires) => {
                    sent.queued = true;
                    sent.expires_unix_ms = expires.as_millis();
                }
                Err(e) => sent.reason = e.to_string(),
            }
        } else {
            sent.reason = format!("device {device_id} is offline, and this command is not queued");
        }
    }
    tracing::info!(%device_id, command_id = %sent.command_id, delivered = sent.delivered, queued = sent.queued, command = kind_label(kind), "Sent a command.");
    sent
}

fn kind_label(kind: &proto::command::Kind) -> &'static str {
    use proto::command::Kind;
    match kind {
        Kind::RunBenchmark(_) => "benchmark",
        Kind::Calibrate(_) => "calibration",
        Kind::Prestage(_) => "prestage",
        Kind::Evaluate(_) => "evaluation",
        Kind::CollectLogs(_) => "logs",
        Kind::Cancel(_) => "cancel",
        Kind::SupportBundle(_) => "support_bundle",
        Kind::RestartRuntime(_) => "restart_runtime",
        Kind::Reverify(_) => "reverify",
    }
}
