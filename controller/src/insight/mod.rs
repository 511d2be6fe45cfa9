//! Performance and quality insight: ingesting agents' telemetry, benchmarks and quality evaluations
//! (`evaluations`), time-bucketed rollups with retention, and the pure A/B comparison (`compare`), serving
//! error rates (`errors`), p95 serving latency (`latency`), quality summaries (`quality`) and variant
//! recommendation that the API, the CLI and the rollout gates share, and serving trends over time (`trends`).
//!
//! Ingestion is cheap per report: a telemetry report is one transaction without fsync (the device's newest
//! telemetry and its measurement window); rollups accumulate in memory, bounded, and are merged into the
//! store by [`flush_loop`] every [`FLUSH_INTERVAL`] in one durable transaction, which also applies the
//! retention.

pub mod compare;
pub mod errors;
pub mod evaluations;
pub mod latency;
pub mod quality;
pub mod queries;
pub mod recommend;
pub mod stats;
pub mod trends;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_shared::clock::{SharedClock, UnixMs};
use alki_shared::ids::DeviceId;
use alki_shared::proto;

use crate::store::{Rollup, Store, StoreError};

/// How often agents are asked to report serving telemetry (Welcome): often enough for a gate to see a
/// step's effect within a minute, rare enough that 5,000 devices cost the controller little.
pub const TELEMETRY_INTERVAL_SECONDS: u32 = 10;
/// Width of a rollup bucket.
pub const BUCKET_MS: i64 = 5 * 60 * 1000;
/// Rollups and per-device measurements older than this are pruned.
pub const RETENTION_MS: i64 = 14 * 24 * 3600 * 1000;
/// How often accumulated rollups are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(30);

/// Counters and the in-memory rollup accumulator. Cheap to share; locks are never held across an await.
#[derive(Default)]
pub struct Ingest {
    pending: Mutex<HashMap<String, Rollup>>,
    /// Newest cumulative (bundle, requests, errors) per device, to turn counters into increments.
    counters: Mutex<HashMap<String, (String, u64, u64)>>,
    pub telemetry_reports: AtomicU64,
    pub benchmark_results: AtomicU64,
    /// Telemetry reports not rolled up because the accumulator was full.
    pub rollups_dropped: AtomicU64,
    pub rollup_flushes: AtomicU64,
    /// Quality evaluation reports, by outcome.
    pub evaluations: evaluations::EvalCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps of numbers: a panic elsewhere cannot leave one in a state worth refusing.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ingest {
    /// Records a telemetry report (the store I/O is one transaction without fsync) and rolls it up.
    pub fn telemetry(
        &self,
        store: &Store,
        device_id: &DeviceId,
        t: &proto::Telemetry,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        let class = store.record_telemetry(device_id, t, now)?;
        self.telemetry_reports.fetch_add(1, Ordering::Relaxed);
        self.roll_up(device_id.as_str(), &class, t, now);
        Ok(())
    }

    /// Records a benchmark report durably. True when results were recorded: performance gates may now
    /// decide, so the rollout reconciler should look again.
    pub fn benchmarks(
        &self,
        store: &Store,
        device_id: &DeviceId,
        report: &proto::BenchmarkReport,
        now: UnixMs,
    ) -> Result<bool, StoreError> {
        if !report.error.is_empty() {
            tracing::warn!(command_id = %report.command_id, error = %report.error, "Agent could not run a benchmark.");
        }
        if report.results.is_empty() {
            return Ok(false);
        }
        store.record_benchmarks(device_id, &report.results, now)?;
        self.benchmark_results.fetch_add(report.results.len() as u64, Ordering::Relaxed);
        tracing::info!(command_id = %report.command_id, results = report.results.len(), "Recorded benchmark results.");
        Ok(true)
    }

    /// Adds one report of a device of `class` to its bucket.
    pub fn roll_up(&self, device_id: &str, class: &str, t: &proto::Telemetry, now: UnixMs) {
        let (requests, errors) = {
            let mut counters = lock(&self.counters);
            let previous = counters
                .insert(device_id.to_owned(), (t.bundle_digest.clone(), t.requests_total, t.request_errors_total));
            match previous {
                // Same bundle and counters that did not go backwards (an agent restart resets them).
                Some((bundle, r, e)) if bundle == t.bundle_digest && t.requests_total >= r => {
                    (t.requests_total - r, t.request_errors_total.saturating_sub(e))
                }
                Some(_) => (t.requests_total, t.request_errors_total),
                None => (0, 0),
            }
        };
        let at = if t.at_unix_ms > 0 { t.at_unix_ms } else { now.as_millis() };
        let mut add = Rollup {
            bucket_unix_ms: at - at.rem_euclid(BUCKET_MS),
            class: class.to_owned(),
            bundle_digest: t.bundle_digest.clone(),
            variant_digest: t.variant_digest.clone(),
            reports: 1,
            requests,
            errors,
            throttled_reports: u64::from(t.throttled),
            ..Default::default()
        };
        if t.generation_tokens_per_second > 0.0 && t.generation_tokens_per_second.is_finite() {
            let v = t.generation_tokens_per_second;
            (add.tokens_per_second_sum, add.tokens_per_second_count) = (v, 1);
            (add.tokens_per_second_min, add.tokens_per_second_max) = (v, v);
        }
        if t.ttft_ms > 0.0 && t.ttft_ms.is_finite() {
            (add.ttft_ms_sum, add.ttft_ms_count, add.ttft_ms_max) = (t.ttft_ms, 1, t.ttft_ms);
        }
        let mut pending = lock(&self.pending);
        let key = add.key();
        if let Some(existing) = pending.get_mut(&key) {
            existing.merge(&add);
        } else if pending.len() < crate::store::MAX_ROLLUP_KEYS {
            pending.insert(key, add);
        } else {
            self.rollups_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The rollups accumulated since the last flush (a trend's newest buckets).
    pub fn pending_rollups(&self) -> Vec<Rollup> {
        lock(&self.pending).values().cloned().collect()
    }

    /// Writes the accumulated rollups and applies the retention. On a store error the rollups are kept
    /// for the next flush.
    pub fn flush(&self, store: &Store, now: UnixMs) -> Result<usize, StoreError> {
        let batch: Vec<Rollup> = lock(&self.pending).drain().map(|(_, r)| r).collect();
        match store.flush_rollups(&batch, UnixMs(now.as_millis() - RETENTION_MS)) {
            Ok(pruned) => {
                self.rollup_flushes.fetch_add(1, Ordering::Relaxed);
                Ok(pruned)
            }
            Err(e) => {
                let mut pending = lock(&self.pending);
                for r in batch {
                    match pending.get_mut(&r.key()) {
                        Some(existing) => existing.merge(&r),
                        None => {
                            pending.insert(r.key(), r);
                        }
                    }
                }
                Err(e)
            }
        }
    }
}

/// Flushes `ingest`'s rollups into `store` every [`FLUSH_INTERVAL`] until `stop` is cancelled, then once more.
pub async fn flush_loop(
    ingest: Arc<Ingest>,
    store: Store,
    clock: SharedClock,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
            _ = stop.cancelled() => true,
        };
        let (ingest, store, now) = (ingest.clone(), store.clone(), clock.now());
        let result = tokio::task::spawn_blocking(move || ingest.flush(&store, now)).await;
        match result {
            Ok(Ok(pruned)) if pruned > 0 => tracing::info!(pruned, "Pruned telemetry rollups past their retention."),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "Could not write telemetry rollups; keeping them for the next flush.")
            }
            Err(error) => tracing::error!(%error, "Telemetry rollup flush panicked."),
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_roll_up_per_bucket_with_counter_increments() {
        let ingest = Ingest::default();
        let t = |at: i64, requests: u64, tps: f64| proto::Telemetry {
            at_unix_ms: at,
            bundle_digest: "sha256:aa".into(),
            requests_total: requests,
            generation_tokens_per_second: tps,
            ..Default::default()
        };
        ingest.roll_up("d1", "pi5-8g", &t(1_000, 10, 5.0), UnixMs::EPOCH);
        ingest.roll_up("d1", "pi5-8g", &t(2_000, 25, 7.0), UnixMs::EPOCH);
        ingest.roll_up("d1", "pi5-8g", &t(BUCKET_MS + 1, 30, 0.0), UnixMs::EPOCH);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        ingest.flush(&store, UnixMs(BUCKET_MS * 2)).expect("flush");
        let rollups = store.rollups(UnixMs::EPOCH).expect("rollups");
        assert_eq!(rollups.len(), 2);
        let first = &rollups[0];
        assert_eq!((first.reports, first.requests, first.tokens_per_second_count), (2, 15, 2));
        assert_eq!((first.tokens_per_second_min, first.tokens_per_second_max), (5.0, 7.0));
        assert_eq!((rollups[1].requests, rollups[1].tokens_per_second_count), (5, 0));
        assert!(lock(&ingest.pending).is_empty());
    }
}
