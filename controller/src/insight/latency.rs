//! p95 request latency of a rollout's candidate B against its baseline A per hardware class, from the front
//! proxy's per-bundle latency histograms: the p95 latency gate's math. Pure: the rollout engine calls it
//! with the devices' [`Measurements`].
//!
//! # Rules
//!
//! - **Sides** as in `insight::errors`: **B**, the rollout's candidate devices (not returned to A) on the
//!   candidate; **A**, the same devices on their baseline before the swap, plus selected devices still on
//!   A, on what they run. A device is a sample of a side once its histogram there holds an observation.
//! - A side's histograms are **pooled**: counts added bucket by bucket. The first histogram sets the
//!   side's bucket bounds; one with other bounds (another agent version) is re-bucketed onto them by
//!   linear interpolation, which is exact when the bounds are the same.
//! - **p95** follows Prometheus' `histogram_quantile`: the rank is 0.95 × the count; the value is
//!   interpolated linearly inside the bucket holding that rank, from its lower bound (0 for the first
//!   bucket) to its upper bound; a rank in the +Inf bucket gives the last finite bound.
//! - The gate judges once each side has `min_samples` samples; until then it is unmeasured.
//! - B **fails** when its p95 exceeds `max_p95_latency_ratio` × A's p95.

use std::collections::{BTreeMap, HashSet};

use alki_shared::proto;

use super::compare::{Measurements, PerfVerdict};
use crate::facts::{hardware_class, selects};
use crate::store::LatencyHistogram;

/// The quantile the gate compares.
pub const QUANTILE: f64 = 0.95;

/// Histograms pooled: finite upper bounds (ms) and the cumulative count at each, then the total (+Inf).
/// Counts are fractional once a histogram was re-bucketed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pooled {
    pub bounds_ms: Vec<f64>,
    pub cumulative: Vec<f64>,
}

impl Pooled {
    /// Adds a well-formed histogram, re-bucketed onto these bounds (the first one sets them).
    fn add(&mut self, h: &LatencyHistogram) {
        if self.cumulative.is_empty() {
            self.bounds_ms = h.bounds_ms.clone();
            self.cumulative = vec![0.0; h.bounds_ms.len() + 1];
        }
        for (bound, c) in self.bounds_ms.iter().zip(self.cumulative.iter_mut()) {
            *c += cumulative_at(h, *bound);
        }
        if let Some(total) = self.cumulative.last_mut() {
            *total += h.count() as f64;
        }
    }

    /// Every observation.
    pub fn count(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// The `q` quantile (see the module documentation); None without observations or finite bounds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(q, &self.bounds_ms, &self.cumulative)
    }
}

/// How many of `h`'s observations are at or under `x`, interpolating linearly inside the bucket holding
/// `x`. Observations in +Inf are only known to be above the last finite bound: they never count.
pub fn cumulative_at(h: &LatencyHistogram, x: f64) -> f64 {
    let i = h.bounds_ms.partition_point(|b| *b < x);
    let count = |i: usize| h.cumulative.get(i).copied().unwrap_or(0) as f64;
    let Some(&upper) = h.bounds_ms.get(i) else {
        return if i == 0 { 0.0 } else { count(i - 1) };
    };
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { (h.bounds_ms[i - 1], count(i - 1)) };
    if upper <= lower {
        return count(i);
    }
    below + (count(i) - below) * ((x - lower) / (upper - lower)).clamp(0.0, 1.0)
}

/// Prometheus' `histogram_quantile` over cumulative counts (`bounds_ms.len() + 1` of them, +Inf last).
pub fn quantile(q: f64, bounds_ms: &[f64], cumulative: &[f64]) -> Option<f64> {
    let total = *cumulative.last()?;
    let last_bound = *bounds_ms.last()?;
    if total.is_nan() || total <= 0.0 || cumulative.len() != bounds_ms.len() + 1 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let i = cumulative.partition_point(|c| *c < rank);
    let Some(&upper) = bounds_ms.get(i) else { return Some(last_bound) };
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { (bounds_ms[i - 1], cumulative[i - 1]) };
    let in_bucket = cumulative[i] - below;
    if in_bucket <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / in_bucket)
}

/// One side's pooled latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Side {
    /// Devices with at least one observation.
    pub devices: u32,
    pub pooled: Pooled,
}

impl Side {
    fn add(&mut self, h: &LatencyHistogram) {
        if h.count() > 0 && h.is_well_formed() {
            self.devices += 1;
            self.pooled.add(h);
        }
    }

    /// The side's p95 in milliseconds; None without observations.
    pub fn p95(&self) -> Option<f64> {
        self.pooled.quantile(QUANTILE)
    }

    /// Requests measured.
    pub fn requests(&self) -> u64 {
        self.pooled.count().round() as u64
    }
}

/// A class's latency on both sides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassLatency {
    pub a: Side,
    pub b: Side,
}

/// Each class's A and B latency (see the module documentation for who counts on which side).
pub fn per_class<'a>(
    rollout: &proto::Rollout,
    devices: impl IntoIterator<Item = &'a proto::Device>,
    records: &[proto::RolloutDevice],
    m: &Measurements,
) -> BTreeMap<String, ClassLatency> {
    let candidate = rollout.candidate.as_ref().map(|c| c.digest.as_str()).unwrap_or_default();
    let mut classes: BTreeMap<String, ClassLatency> = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome != proto::DeviceOutcome::Reverted as i32) {
        let class = classes.entry(r.class.clone()).or_default();
        if let Some(h) = r.baseline.as_ref().and_then(|b| m.latency(&r.device_id, &b.digest)) {
            class.a.add(h);
        }
        if let Some(h) = m.latency(&r.device_id, candidate) {
            class.b.add(h);
        }
    }
    let in_b: HashSet<&str> = records.iter().map(|r| r.device_id.as_str()).collect();
    let selector = rollout.spec.as_ref().map(|s| &s.selector);
    for d in devices {
        if in_b.contains(d.id.as_str()) || !selector.is_some_and(|s| selects(s, &d.labels)) {
            continue;
        }
        let running = d.running.as_ref().map(|b| b.digest.as_str()).filter(|r| *r != candidate);
        if let Some(h) = running.and_then(|r| m.latency(&d.id, r)) {
            classes.entry(hardware_class(d)).or_default().a.add(h);
        }
    }
    classes
}

/// "840 ms", "4.2 ms".
pub fn ms(v: f64) -> String {
    if v >= 10.0 { format!("{v:.0} ms") } else { format!("{v:.1} ms") }
}

/// Judges a class's latency against `max_ratio` (None: the gate is off).
pub fn judge(c: Option<&ClassLatency>, max_ratio: Option<f64>, min_samples: usize) -> PerfVerdict {
    let Some(max) = max_ratio else { return PerfVerdict::Off };
    let none = ClassLatency::default();
    let c = c.unwrap_or(&none);
    let min = min_samples.max(1) as u32;
    let counts =
        format!("A {} requests on {} devices, B {} on {}", c.a.requests(), c.a.devices, c.b.requests(), c.b.devices);
    let (Some(a), Some(b)) = (c.a.p95(), c.b.p95()) else {
        return PerfVerdict::Unmeasured(format!("p95 latency not measured: no requests on both sides ({counts})"));
    };
    if c.a.devices < min || c.b.devices < min {
        return PerfVerdict::Unmeasured(format!("p95 latency measured on too few devices, {min} needed ({counts})"));
    }
    if b > max * a {
        PerfVerdict::Fail(format!(
            "p95 latency {} on B is {:.2}x A's {}, over the gate {max}x (--max-p95-latency-ratio; {counts})",
            ms(b),
            b / a,
            ms(a)
        ))
    } else {
        PerfVerdict::Pass(format!("p95 latency {} (A {}, max {max}x)", ms(b), ms(a)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// The agent's bounds (`LATENCY_BUCKETS_MS`).
    const AGENT_BOUNDS: [f64; 14] =
        [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 120000.0];

    /// A histogram over `bounds` from per-bucket counts (+Inf last).
    fn histogram(bounds: &[f64], per_bucket: &[u64]) -> LatencyHistogram {
        let mut running = 0;
        let cumulative = per_bucket
            .iter()
            .map(|c| {
                running += c;
                running
            })
            .collect();
        LatencyHistogram { bounds_ms: bounds.to_vec(), cumulative, sum_ms: 0.0 }
    }

    fn p95(h: &LatencyHistogram) -> Option<f64> {
        let mut side = Side::default();
        side.add(h);
        side.p95()
    }

    #[test]
    fn p95_interpolates_inside_its_bucket_as_prometheus_does() {
        // 100 requests: 90 under 100 ms, 10 in (100, 250]: rank 95 is half-way into the second bucket.
        assert_eq!(p95(&histogram(&[100.0, 250.0], &[90, 10, 0])), Some(175.0));
        // All in the first bucket: from 0 to its bound.
        assert_eq!(p95(&histogram(&[100.0, 250.0], &[20, 0, 0])), Some(95.0));
        // The rank in +Inf: the last finite bound.
        assert_eq!(p95(&histogram(&[100.0, 250.0], &[1, 1, 98])), Some(250.0));
        assert_eq!(p95(&histogram(&[100.0], &[0, 0])), None, "no requests");
        assert_eq!(quantile(0.95, &[], &[5.0]), None, "no finite bound");
        assert_eq!(quantile(0.95, &[10.0], &[5.0, 5.0, 5.0]), None, "counts not aligned with the bounds");
    }

    #[test]
    fn histograms_with_other_bounds_are_rebucketed_and_the_same_bounds_pool_exactly() {
        let coarse = histogram(&[100.0, 200.0], &[50, 50, 0]);
        // 0..=100 holds 50, so 50 is estimated (linearly) at or under 50 ms, 75 under 150 ms.
        assert_eq!(cumulative_at(&coarse, 50.0), 25.0);
        assert_eq!(cumulative_at(&coarse, 150.0), 75.0);
        assert_eq!(cumulative_at(&coarse, 400.0), 100.0, "beyond the last bound: all finite observations");
        let mut side = Side::default();
        side.add(&histogram(&[50.0, 150.0], &[10, 0, 0]));
        side.add(&coarse);
        assert_eq!(side.pooled.cumulative, vec![35.0, 85.0, 110.0]);
        assert_eq!((side.devices, side.requests()), (2, 110));
        let mut same = Side::default();
        same.add(&histogram(&AGENT_BOUNDS, &[1; 15]));
        same.add(&histogram(&AGENT_BOUNDS, &[2; 15]));
        assert_eq!(same.pooled.cumulative, (1..=15).map(|i| f64::from(i) * 3.0).collect::<Vec<_>>());
        // Malformed or empty histograms are no sample.
        same.add(&LatencyHistogram { bounds_ms: vec![10.0], cumulative: vec![5, 3], sum_ms: 0.0 });
        same.add(&histogram(&AGENT_BOUNDS, &[0; 15]));
        assert_eq!(same.devices, 2);
    }

    fn class(a: (u32, &[u64]), b: (u32, &[u64])) -> ClassLatency {
        let side = |(devices, per_bucket): (u32, &[u64])| {
            let mut s = Side::default();
            for _ in 0..devices {
                s.add(&histogram(&AGENT_BOUNDS, per_bucket));
            }
            s
        };
        ClassLatency { a: side(a), b: side(b) }
    }

    #[test]
    fn b_slower_than_the_ratio_allows_fails_with_both_p95_values_named() {
        // A: every request in (250, 500] ms; B: in (500, 1000].
        let (mut a, mut b) = ([0u64; 15], [0u64; 15]);
        a[6] = 100;
        b[7] = 100;
        let c = class((3, &a), (2, &b));
        let PerfVerdict::Fail(why) = judge(Some(&c), Some(1.5), 2) else { panic!("B is twice as slow") };
        assert!(
            why.starts_with("p95 latency 975 ms on B is 2.00x A's 488 ms, over the gate 1.5x (--max-p95-latency-ratio"),
            "{why}"
        );
        assert!(why.contains("A 300 requests on 3 devices, B 200 on 2"), "{why}");
        assert!(
            matches!(judge(Some(&c), Some(2.0), 2), PerfVerdict::Pass(v) if v == "p95 latency 975 ms (A 488 ms, max 2x)")
        );
        assert_eq!(judge(Some(&c), None, 2), PerfVerdict::Off);
        let few = judge(Some(&c), Some(1.5), 3);
        assert!(matches!(&few, PerfVerdict::Unmeasured(why) if why.contains("too few devices, 3 needed")), "{few:?}");
        let nothing = judge(None, Some(1.5), 1);
        assert!(matches!(&nothing, PerfVerdict::Unmeasured(why) if why.contains("no requests on both sides")));
        let as_fast = class((3, &a), (2, &a));
        assert!(matches!(judge(Some(&as_fast), Some(1.0), 2), PerfVerdict::Pass(_)), "equal p95 is within 1x");
    }

    #[test]
    fn per_class_pools_b_against_the_same_devices_before_and_the_devices_still_on_a() {
        let bundle = |d: &str| proto::BundleRef { digest: d.into(), ..Default::default() };
        let rollout = proto::Rollout {
            spec: Some(proto::RolloutSpec {
                selector: HashMap::from([("site".to_owned(), "lab".to_owned())]),
                ..Default::default()
            }),
            candidate: Some(bundle("sha256:bb")),
            ..Default::default()
        };
        let mut m = Measurements::default();
        let (mut devices, mut records) = (Vec::new(), Vec::new());
        for i in 0..5 {
            let id = format!("d{i}");
            devices.push(proto::Device {
                id: id.clone(),
                labels: HashMap::from([("site".to_owned(), "lab".to_owned()), ("class".to_owned(), "pi".to_owned())]),
                running: Some(bundle(if i < 3 { "sha256:bb" } else { "sha256:aa" })),
                ..Default::default()
            });
            m.insert_latency(&id, "sha256:aa", histogram(&[100.0, 1000.0], &[10, 0, 0]));
            if i < 3 {
                let outcome = if i == 2 { proto::DeviceOutcome::Reverted } else { proto::DeviceOutcome::Active };
                records.push(proto::RolloutDevice {
                    device_id: id.clone(),
                    class: "pi".into(),
                    baseline: Some(bundle("sha256:aa")),
                    outcome: outcome as i32,
                    ..Default::default()
                });
                m.insert_latency(&id, "sha256:bb", histogram(&[100.0, 1000.0], &[0, 10, 0]));
            }
        }
        let pi = &per_class(&rollout, &devices, &records, &m)["pi"];
        // A: d0, d1 before the swap and d3, d4 still on A (d2 returned to A is left out); B: d0, d1.
        assert_eq!((pi.a.devices, pi.a.requests(), pi.b.devices, pi.b.requests()), (4, 40, 2, 20));
        assert_eq!((pi.a.p95(), pi.b.p95()), (Some(95.0), Some(955.0)));
    }

    proptest! {
        /// The p95 lies within the bucket holding the 95th percentile sample (the ceil(0.95 n)-th smallest),
        /// or is the last finite bound when that sample is in +Inf; and it never decreases with the quantile.
        #[test]
        fn p95_is_within_the_bucket_that_holds_the_95th_sample(
            per_bucket in proptest::collection::vec(0u64..50, 1..16),
            gaps in proptest::collection::vec(0.5f64..1000.0, 15),
        ) {
            let bounds: Vec<f64> = gaps
                .iter()
                .take(per_bucket.len() - 1)
                .scan(0.0, |at, g| { *at += g; Some(*at) })
                .collect();
            let h = histogram(&bounds, &per_bucket);
            let n = h.count();
            let p = p95(&h);
            if n == 0 || bounds.is_empty() {
                prop_assert_eq!(p, None);
                return Ok(());
            }
            let p = p.expect("observations");
            let k = (QUANTILE * n as f64).ceil() as u64;
            let bucket = h.cumulative.iter().position(|c| *c >= k).expect("the total reaches k");
            match bounds.get(bucket) {
                Some(&upper) => {
                    let lower = if bucket == 0 { 0.0 } else { bounds[bucket - 1] };
                    prop_assert!(lower - 1e-9 <= p && p <= upper + 1e-9, "{} not in [{}, {}]", p, lower, upper);
                }
                None => prop_assert_eq!(p, bounds[bounds.len() - 1]),
            }
            let mut side = Side::default();
            side.add(&h);
            let p50 = side.pooled.quantile(0.5).expect("observations");
            prop_assert!(p50 <= p + 1e-9);
        }
    }
}
