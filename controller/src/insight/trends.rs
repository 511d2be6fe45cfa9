//! Serving trends over time: the 5-minute telemetry rollups (stored, and those not flushed yet) as means per
//! bucket, filtered by class and bundle, for the console's charts. Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::Rollup;

/// Buckets one answer carries at most; the newest are kept (a week of one class and bundle is 2,016).
pub const MAX_BUCKETS: usize = 10_000;

/// Which rollups a trend reads; empty fields match every class or bundle.
#[derive(Clone, Debug, Default)]
pub struct TrendFilter {
    pub since_unix_ms: i64,
    pub class: String,
    pub bundle: String,
}

/// One bucket of one (class, bundle, variant), as `/api/v1/trends` answers it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrendBucket {
    pub bucket_unix_ms: i64,
    pub class: String,
    pub bundle_digest: String,
    pub variant_digest: String,
    pub reports: u64,
    pub requests: u64,
    pub errors: u64,
    /// 0 when no report in the bucket measured it.
    pub tokens_per_second_mean: f64,
    pub tokens_per_second_min: f64,
    pub tokens_per_second_max: f64,
    pub ttft_ms_mean: f64,
    pub ttft_ms_max: f64,
    pub throttled_reports: u64,
}

/// The stored and pending rollups matching `filter`, merged by key (a bucket may be in both while it is
/// being flushed), oldest first, at most [`MAX_BUCKETS`] (the newest).
pub fn trends(stored: Vec<Rollup>, pending: Vec<Rollup>, filter: &TrendFilter) -> Vec<TrendBucket> {
    let mut merged: BTreeMap<String, Rollup> = BTreeMap::new();
    let wanted = |r: &Rollup| {
        r.bucket_unix_ms >= filter.since_unix_ms
            && (filter.class.is_empty() || r.class == filter.class)
            && (filter.bundle.is_empty() || r.bundle_digest == filter.bundle)
    };
    for r in stored.into_iter().chain(pending).filter(wanted) {
        match merged.get_mut(&r.key()) {
            Some(existing) => existing.merge(&r),
            None => {
                merged.insert(r.key(), r);
            }
        }
    }
    let skip = merged.len().saturating_sub(MAX_BUCKETS);
    merged.into_values().skip(skip).map(|r| bucket(&r)).collect()
}

fn bucket(r: &Rollup) -> TrendBucket {
    let mean = |sum: f64, count: u64| if count == 0 { 0.0 } else { sum / count as f64 };
    TrendBucket {
        bucket_unix_ms: r.bucket_unix_ms,
        class: r.class.clone(),
        bundle_digest: r.bundle_digest.clone(),
        variant_digest: r.variant_digest.clone(),
        reports: r.reports,
        requests: r.requests,
        errors: r.errors,
        tokens_per_second_mean: mean(r.tokens_per_second_sum, r.tokens_per_second_count),
        tokens_per_second_min: r.tokens_per_second_min,
        tokens_per_second_max: r.tokens_per_second_max,
        ttft_ms_mean: mean(r.ttft_ms_sum, r.ttft_ms_count),
        ttft_ms_max: r.ttft_ms_max,
        throttled_reports: r.throttled_reports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollup(bucket: i64, class: &str, tps: f64) -> Rollup {
        Rollup {
            bucket_unix_ms: bucket,
            class: class.into(),
            bundle_digest: "sha256:a".into(),
            reports: 1,
            tokens_per_second_sum: tps,
            tokens_per_second_count: 1,
            tokens_per_second_min: tps,
            tokens_per_second_max: tps,
            ..Default::default()
        }
    }

    #[test]
    fn stored_and_pending_buckets_merge_into_means_oldest_first() {
        let stored = vec![rollup(600_000, "pi5", 10.0), rollup(300_000, "pi5", 8.0), rollup(0, "pi5", 1.0)];
        let pending = vec![rollup(600_000, "pi5", 20.0), rollup(600_000, "orin", 50.0)];
        let filter = TrendFilter { since_unix_ms: 300_000, class: "pi5".into(), ..Default::default() };
        let out = trends(stored, pending, &filter);
        assert_eq!(out.iter().map(|b| b.bucket_unix_ms).collect::<Vec<_>>(), [300_000, 600_000]);
        let last = &out[1];
        assert_eq!((last.reports, last.tokens_per_second_mean), (2, 15.0));
        assert_eq!((last.tokens_per_second_min, last.tokens_per_second_max), (10.0, 20.0));
        assert_eq!(out[0].ttft_ms_mean, 0.0, "nothing measured reads as 0, not NaN");
    }

    #[test]
    fn an_answer_keeps_the_newest_buckets() {
        let stored = (0..MAX_BUCKETS as i64 + 5).map(|i| rollup(i * 300_000, "pi5", 1.0)).collect();
        let out = trends(stored, Vec::new(), &TrendFilter::default());
        assert_eq!(out.len(), MAX_BUCKETS);
        assert_eq!(out[0].bucket_unix_ms, 5 * 300_000);
    }
}
