//! Front-proxy latency histograms per device and bundle: a report's buckets checked (a bounded number,
//! positive increasing bounds, cumulative counts, a last +Inf bucket) and the increments of the agents'
//! cumulative histograms added up across agent restarts, the way [`super::Traffic`] adds up requests.
//! What the p95 latency gate (`insight::latency`) pools.

use alki_shared::proto;
use serde::{Deserialize, Serialize};

/// Buckets one histogram may have, +Inf included (the agent sends 15): bounds what a device record keeps.
pub const MAX_LATENCY_BUCKETS: usize = 32;
/// Highest count a bucket may carry (about 10^12 requests, years of traffic at thousands a second): a
/// larger one is a broken agent, not traffic, and would swamp every other device's samples.
pub const MAX_LATENCY_COUNT: u64 = 1 << 40;

/// A latency histogram in milliseconds, Prometheus style.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencyHistogram {
    /// Finite upper bounds, positive and strictly increasing.
    pub bounds_ms: Vec<f64>,
    /// Observations at or under each bound, then every observation (the +Inf bucket): one more value than
    /// `bounds_ms`, never decreasing.
    pub cumulative: Vec<u64>,
    pub sum_ms: f64,
}

/// Why a reported histogram was ignored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadHistogram {
    #[error("{0} buckets, more than the {MAX_LATENCY_BUCKETS} accepted")]
    TooManyBuckets(usize),
    #[error("no +Inf bucket last")]
    NoInfBucket,
    #[error("a +Inf bucket at position {0} that is not the last")]
    InfNotLast(usize),
    #[error("bucket {index} has the bound {bound} ms; bounds must be finite and positive")]
    BadBound { index: usize, bound: f64 },
    #[error("bucket {index}'s bound {bound} ms is not above the previous one ({previous} ms)")]
    BoundsNotIncreasing { index: usize, bound: f64, previous: f64 },
    #[error("bucket {index}'s count {count} is below the previous bucket's {previous}; counts must be cumulative")]
    NotCumulative { index: usize, count: u64, previous: u64 },
    #[error("bucket {index}'s count {count} is over {MAX_LATENCY_COUNT}")]
    AbsurdCount { index: usize, count: u64 },
}

/// Two bounds lists are the same layout (bounds go through JSON, so equal within rounding).
fn same_bounds(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-9 * x.abs().max(1.0))
}

impl LatencyHistogram {
    /// A report's buckets as a histogram: None when it carries none (nothing served yet, or an agent that
    /// does not measure latency); an error naming what is wrong when they are malformed.
    pub fn from_report(
        buckets: &[proto::HistogramBucket],
        sum_ms: f64,
    ) -> Result<Option<LatencyHistogram>, BadHistogram> {
        if buckets.is_empty() {
            return Ok(None);
        }
        if buckets.len() > MAX_LATENCY_BUCKETS {
            return Err(BadHistogram::TooManyBuckets(buckets.len()));
        }
        let (last, finite) = buckets.split_last().ok_or(BadHistogram::NoInfBucket)?;
        if !last.inf {
            return Err(BadHistogram::NoInfBucket);
        }
        let mut h = LatencyHistogram {
            bounds_ms: Vec::with_capacity(finite.len()),
            cumulative: Vec::with_capacity(buckets.len()),
            sum_ms: if sum_ms.is_finite() && sum_ms > 0.0 { sum_ms } else { 0.0 },
        };
        for (index, b) in buckets.iter().enumerate() {
            if b.count > MAX_LATENCY_COUNT {
                return Err(BadHistogram::AbsurdCount { index, count: b.count });
            }
            if let Some(&previous) = h.cumulative.last()
                && b.count < previous
            {
                return Err(BadHistogram::NotCumulative { index, count: b.count, previous });
            }
            h.cumulative.push(b.count);
            if index + 1 == buckets.len() {
                break;
            }
            if b.inf {
                return Err(BadHistogram::InfNotLast(index));
            }
            if !b.le_ms.is_finite() || b.le_ms <= 0.0 {
                return Err(BadHistogram::BadBound { index, bound: b.le_ms });
            }
            if let Some(&previous) = h.bounds_ms.last()
                && b.le_ms <= previous
            {
                return Err(BadHistogram::BoundsNotIncreasing { index, bound: b.le_ms, previous });
            }
            h.bounds_ms.push(b.le_ms);
        }
        Ok(Some(h))
    }

    /// Every observation.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// True when its shape holds (one count per bound plus +Inf, bounds increasing, counts cumulative):
    /// stored records are checked again before math indexes them.
    pub fn is_well_formed(&self) -> bool {
        self.cumulative.len() == self.bounds_ms.len() + 1
            && self.bounds_ms.iter().all(|b| b.is_finite() && *b > 0.0)
            && self.bounds_ms.windows(2).all(|w| w[0] < w[1])
            && self.cumulative.windows(2).all(|w| w[0] <= w[1])
    }

    /// Observations in bucket `i` alone.
    fn in_bucket(&self, i: usize) -> u64 {
        let below = if i == 0 { 0 } else { self.cumulative.get(i - 1).copied().unwrap_or(0) };
        self.cumulative.get(i).copied().unwrap_or(0).saturating_sub(below)
    }

    /// True when `later` cannot follow this histogram from the same counters: another layout, or a bucket
    /// that lost observations (the agent restarted).
    fn restarted_by(&self, later: &LatencyHistogram) -> bool {
        !same_bounds(&self.bounds_ms, &later.bounds_ms)
            || self.cumulative.len() != later.cumulative.len()
            || (0..later.cumulative.len()).any(|i| later.in_bucket(i) < self.in_bucket(i))
    }

    /// What `later` observed since this histogram (the same layout, not restarted).
    fn increment_to(&self, later: &LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram {
            bounds_ms: later.bounds_ms.clone(),
            cumulative: later.cumulative.iter().zip(&self.cumulative).map(|(l, e)| l.saturating_sub(*e)).collect(),
            sum_ms: (later.sum_ms - self.sum_ms).max(0.0),
        }
    }

    /// Adds another histogram of the same layout.
    fn add(&mut self, other: &LatencyHistogram) {
        for (c, o) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *c = c.saturating_add(*o).min(MAX_LATENCY_COUNT);
        }
        self.sum_ms += other.sum_ms;
    }
}

/// How a report was added to what a device measured on a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// The first report, or what the counters gained since the previous one.
    Counted,
    /// The agent restarted (its counters went back): the report counted whole.
    Restarted,
    /// The agent now uses other bucket bounds: what was accumulated is dropped and counting starts over.
    NewLayout,
}

/// Adds a report's cumulative histogram to `accumulated`, with `last` the previous report of the same
/// device and bundle (both updated). The agent's histograms count since it started: the first report
/// counts whole, and so does one after a restart.
pub fn add_report(
    accumulated: &mut Option<LatencyHistogram>,
    last: &mut Option<LatencyHistogram>,
    report: LatencyHistogram,
) -> Added {
    let (increment, mut added) = match last.as_ref() {
        Some(previous) if !previous.restarted_by(&report) => (previous.increment_to(&report), Added::Counted),
        Some(_) => (report.clone(), Added::Restarted),
        None => (report.clone(), Added::Counted),
    };
    match accumulated {
        Some(sum) if same_bounds(&sum.bounds_ms, &increment.bounds_ms) && sum.is_well_formed() => sum.add(&increment),
        Some(_) => {
            added = Added::NewLayout;
            *accumulated = Some(increment);
        }
        None => *accumulated = Some(increment),
    }
    *last = Some(report);
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(bounds: &[f64], cumulative: &[u64]) -> Vec<proto::HistogramBucket> {
        let mut out: Vec<_> = bounds
            .iter()
            .zip(cumulative)
            .map(|(le, count)| proto::HistogramBucket { le_ms: *le, inf: false, count: *count })
            .collect();
        if let Some(total) = cumulative.get(bounds.len()) {
            out.push(proto::HistogramBucket { le_ms: 0.0, inf: true, count: *total });
        }
        out
    }

    fn histogram(bounds: &[f64], cumulative: &[u64]) -> LatencyHistogram {
        LatencyHistogram::from_report(&buckets(bounds, cumulative), 0.0).expect("valid").expect("buckets")
    }

    #[test]
    fn malformed_buckets_are_refused_with_what_is_wrong() {
        let bad = |b: Vec<proto::HistogramBucket>| LatencyHistogram::from_report(&b, 1.0).expect_err("malformed");
        assert_eq!(LatencyHistogram::from_report(&[], 0.0), Ok(None));
        assert_eq!(
            bad(buckets(&[10.0, 5.0], &[1, 2, 3])),
            BadHistogram::BoundsNotIncreasing { index: 1, bound: 5.0, previous: 10.0 }
        );
        assert_eq!(
            bad(buckets(&[10.0, 20.0], &[3, 2, 4])),
            BadHistogram::NotCumulative { index: 1, count: 2, previous: 3 }
        );
        assert_eq!(bad(buckets(&[10.0, 20.0], &[1, 2])), BadHistogram::NoInfBucket);
        assert_eq!(bad(buckets(&[-1.0], &[1, 2])), BadHistogram::BadBound { index: 0, bound: -1.0 });
        assert!(matches!(bad(buckets(&[f64::NAN], &[1, 2])), BadHistogram::BadBound { index: 0, .. }));
        assert_eq!(
            bad(buckets(&[10.0], &[1, MAX_LATENCY_COUNT + 1])),
            BadHistogram::AbsurdCount { index: 1, count: MAX_LATENCY_COUNT + 1 }
        );
        let mut inf_first = buckets(&[10.0], &[1, 2]);
        inf_first[0].inf = true;
        assert_eq!(bad(inf_first), BadHistogram::InfNotLast(0));
        let bounds: Vec<f64> = (1..=MAX_LATENCY_BUCKETS).map(|i| i as f64).collect();
        let counts: Vec<u64> = (0..=MAX_LATENCY_BUCKETS as u64).collect();
        assert_eq!(bad(buckets(&bounds, &counts)), BadHistogram::TooManyBuckets(MAX_LATENCY_BUCKETS + 1));
        let h = histogram(&[10.0, 20.0], &[1, 3, 4]);
        assert!(h.is_well_formed() && h.count() == 4);
    }

    #[test]
    fn reports_add_up_across_restarts_and_a_new_layout_starts_over() {
        let (mut sum, mut last) = (None, None);
        let bounds = [10.0, 100.0];
        // 5 requests before the first report count; then increments; then the agent restarted.
        assert_eq!(add_report(&mut sum, &mut last, histogram(&bounds, &[2, 4, 5])), Added::Counted);
        assert_eq!(add_report(&mut sum, &mut last, histogram(&bounds, &[3, 6, 8])), Added::Counted);
        assert_eq!(add_report(&mut sum, &mut last, histogram(&bounds, &[0, 1, 1])), Added::Restarted);
        assert_eq!(add_report(&mut sum, &mut last, histogram(&bounds, &[0, 2, 3])), Added::Counted);
        assert_eq!(sum.as_ref().map(|h| h.cumulative.clone()), Some(vec![3, 8, 11]));
        // A restart that served more than before in total, but less in one bucket, is still a restart.
        assert_eq!(add_report(&mut sum, &mut last, histogram(&bounds, &[9, 9, 9])), Added::Restarted);
        assert_eq!(sum.as_ref().map(|h| h.cumulative.clone()), Some(vec![12, 17, 20]));
        assert_eq!(add_report(&mut sum, &mut last, histogram(&[50.0], &[1, 2])), Added::NewLayout);
        assert_eq!(sum, Some(histogram(&[50.0], &[1, 2])));
    }
}
