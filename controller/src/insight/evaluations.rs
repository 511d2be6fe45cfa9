//! Ingesting agents' quality evaluation reports: each result read back with
//! `alki_shared::eval::wire::from_proto` and checked against its report, stored newest-per-key
//! (`store::evaluations`), and counted by outcome and could-not-run kind for `/metrics`. A report that does
//! not parse is refused with a log line and a counter: it never reaches a gate.

use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::clock::UnixMs;
use alki_shared::eval::quality::{CouldNotRun, Outcome};
use alki_shared::eval::wire::{self, WireError};
use alki_shared::ids::DeviceId;
use alki_shared::proto;

use crate::store::{Store, StoreError, StoredEvaluation};

/// The could-not-run kinds as the wire and the metrics name them, in [`EvalCounters::could_not_run`] order.
pub const COULD_NOT_RUN_KINDS: [&str; 5] =
    ["does_not_fit", "suite_too_large_for_budget", "out_of_time", "tool_missing", "failed"];

fn kind_index(c: &CouldNotRun) -> usize {
    match c {
        CouldNotRun::DoesNotFit { .. } => 0,
        CouldNotRun::SuiteTooLargeForBudget { .. } => 1,
        CouldNotRun::OutOfTime { .. } => 2,
        CouldNotRun::ToolMissing { .. } => 3,
        CouldNotRun::Failed { .. } => 4,
    }
}

/// What ingestion has seen since the controller started.
#[derive(Default)]
pub struct EvalCounters {
    pub measured: AtomicU64,
    /// By kind, in [`COULD_NOT_RUN_KINDS`] order.
    pub could_not_run: [AtomicU64; 5],
    /// Reports refused because they do not parse.
    pub refused: AtomicU64,
}

/// [`EvalCounters`] read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalCounts {
    pub measured: u64,
    pub could_not_run: [u64; 5],
    pub refused: u64,
}

impl EvalCounters {
    pub fn snapshot(&self) -> EvalCounts {
        EvalCounts {
            measured: self.measured.load(Ordering::Relaxed),
            could_not_run: std::array::from_fn(|i| self.could_not_run[i].load(Ordering::Relaxed)),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("it carries no result")]
    NoResult,
    #[error("it names no {0} digest")]
    Missing(&'static str),
    #[error("its suite {report} is not the suite of its result ({result})")]
    SuiteMismatch { report: String, result: String },
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads a report into what the store keeps, refusing what does not parse or contradicts itself.
pub fn parse(device_id: &DeviceId, report: &proto::EvalReport, now: UnixMs) -> Result<StoredEvaluation, ReportError> {
    let result = wire::from_proto(report.result.as_ref().ok_or(ReportError::NoResult)?)?;
    let bundle = report.bundle.clone().filter(|b| !b.digest.is_empty()).ok_or(ReportError::Missing("bundle"))?;
    let suite = report.suite.clone().filter(|s| !s.digest.is_empty()).ok_or(ReportError::Missing("suite"))?;
    if suite.digest != result.suite.to_string() {
        return Err(ReportError::SuiteMismatch { report: suite.digest, result: result.suite.to_string() });
    }
    Ok(StoredEvaluation {
        device_id: device_id.to_string(),
        hardware_class: String::new(),
        command_id: report.command_id.clone(),
        rollout_id: report.rollout_id.clone(),
        bundle,
        suite,
        baseline: report.baseline.clone().filter(|b| !b.digest.is_empty()),
        at_unix_ms: if report.at_unix_ms > 0 { report.at_unix_ms } else { now.as_millis() },
        received_unix_ms: now.as_millis(),
        result,
    })
}

/// Records a device's evaluation report. True when a result was stored: quality gates may now decide,
/// so the rollout reconciler should look again.
pub fn ingest(
    store: &Store,
    counters: &EvalCounters,
    device_id: &DeviceId,
    report: &proto::EvalReport,
    now: UnixMs,
) -> Result<bool, StoreError> {
    let evaluation = match parse(device_id, report, now) {
        Ok(e) => e,
        Err(error) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %device_id,
                command_id = %report.command_id,
                rollout_id = %report.rollout_id,
                %error,
                "Refused an evaluation report that does not parse; the agent's version may not match the controller's."
            );
            return Ok(false);
        }
    };
    let stored = store.record_evaluation(&evaluation)?;
    let bundle = &evaluation.bundle.digest;
    match &evaluation.result.outcome {
        Outcome::Measured(m) => {
            counters.measured.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                %device_id,
                command_id = %report.command_id,
                rollout_id = %report.rollout_id,
                %bundle,
                golden_passed = m.golden.passed,
                golden_prompts = m.golden.prompts,
                kld = m.kl_divergence.map(|k| k.kld_mean.value),
                "Recorded a quality evaluation."
            );
        }
        Outcome::CouldNotRun(why) => {
            counters.could_not_run[kind_index(why)].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %device_id,
                command_id = %report.command_id,
                rollout_id = %report.rollout_id,
                %bundle,
                reason = %why,
                "A device could not evaluate a bundle."
            );
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use alki_shared::digest::Digest;
    use alki_shared::eval::quality::QualityResult;

    use super::*;

    fn report(suite_in_report: &Digest) -> proto::EvalReport {
        let result = QualityResult {
            suite: Digest::of(b"suite"),
            candidate: Digest::of(b"variant"),
            baseline: None,
            outcome: Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes: 2, available_bytes: 1 }),
        };
        proto::EvalReport {
            bundle: Some(proto::BundleRef { digest: Digest::of(b"bundle").to_string(), ..Default::default() }),
            suite: Some(proto::BundleRef { digest: suite_in_report.to_string(), ..Default::default() }),
            result: Some(wire::to_proto(&result)),
            ..Default::default()
        }
    }

    #[test]
    fn reports_that_do_not_parse_are_refused_and_counted_and_others_stored_by_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let counters = EvalCounters::default();
        let pi = DeviceId::new("pi-1").expect("id");
        let good = report(&Digest::of(b"suite"));
        assert!(ingest(&store, &counters, &pi, &good, UnixMs(5)).expect("ingest"));

        let mut no_outcome = good.clone();
        if let Some(r) = no_outcome.result.as_mut() {
            r.outcome = None;
        }
        let mut bad_digest = good.clone();
        if let Some(r) = bad_digest.result.as_mut() {
            r.variant_digest = "sha256:nope".into();
        }
        let mismatch = report(&Digest::of(b"another suite"));
        let no_bundle = proto::EvalReport { bundle: None, ..good.clone() };
        for bad in [no_outcome, bad_digest, mismatch, no_bundle, proto::EvalReport::default()] {
            assert!(!ingest(&store, &counters, &pi, &bad, UnixMs(6)).expect("refused, not an error"));
        }
        let counts = counters.snapshot();
        assert_eq!((counts.measured, counts.could_not_run, counts.refused), (0, [1, 0, 0, 0, 0], 5));
        let stored = store.evaluations(&Default::default(), 10).expect("list");
        assert_eq!(stored.len(), 1, "refused reports are not stored");
        assert_eq!(stored[0].at_unix_ms, 5, "a report without a time gets the controller's");
        assert_eq!(
            parse(&pi, &report(&Digest::of(b"x")), UnixMs(1)).map(|_| ()),
            Err(ReportError::SuiteMismatch {
                report: Digest::of(b"x").to_string(),
                result: Digest::of(b"suite").to_string()
            })
        );
    }
}
