//! A/B comparison of a rollout, per hardware class: A and B medians and spreads with sample counts, and
//! paired before/after differences per device. Pure: the Compare RPC, `alkictl bench compare`, the
//! dashboard API and the rollout engine's performance gates all call [`compare`].
//!
//! # What is compared
//!
//! - A device's value for a bundle is its newest benchmark of that bundle (the fixed prompt set, so it
//!   compares across devices), else the median of its recent serving telemetry (see [`Measure`]).
//! - **B**: candidate devices of the rollout (not returned to A) with a measurement of the candidate.
//! - **A**: the same candidate devices measured on their baseline before the swap, plus selected devices
//!   still on A, measured on what they run.
//! - **Paired**: candidate devices with both; their ratio B/A removes the spread between devices.
//! - The gate ratio is the median paired ratio once `min_samples` devices are paired, else the ratio of
//!   the medians once each side has `min_samples` devices, else unmeasured (0).

use std::collections::{BTreeMap, HashMap, HashSet};

use alki_shared::proto;

use super::stats::{median, stat};
use crate::facts::{hardware_class, selects};
use crate::store::{LatencyHistogram, PerfRecord, Traffic};

/// One device's representative measurement of one bundle.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measure {
    pub tokens_per_second: Option<f64>,
    pub ttft_ms: Option<f64>,
    /// Requests and errors its front proxy counted while serving the bundle; None until it reported
    /// telemetry of the bundle (the input of the error-rate gate in `insight::errors`).
    pub traffic: Option<Traffic>,
}

impl Measure {
    /// The benchmark's medians when the device benchmarked the bundle, else its telemetry medians.
    pub fn from_record(r: &PerfRecord) -> Measure {
        Measure {
            tokens_per_second: r.benchmark_tokens_per_second.or_else(|| median(&r.tokens_per_second)),
            ttft_ms: r.benchmark_ttft_ms.or_else(|| median(&r.ttft_ms)),
            traffic: r.traffic,
        }
    }

    /// True when it measured speed (tokens/s or time to first token).
    pub fn has_speed(&self) -> bool {
        self.tokens_per_second.is_some() || self.ttft_ms.is_some()
    }

    fn is_empty(&self) -> bool {
        !self.has_speed() && self.traffic.is_none()
    }
}

/// Measurements by (device id, bundle digest).
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    by_device: HashMap<String, HashMap<String, Measure>>,
    /// Front-proxy latency histograms with at least one observation (the input of the p95 latency gate in
    /// `insight::latency`), apart from the small copyable [`Measure`].
    latency: HashMap<String, HashMap<String, LatencyHistogram>>,
}

impl Measurements {
    pub fn from_records(records: &[PerfRecord]) -> Measurements {
        let mut m = Measurements::default();
        for r in records {
            m.insert(&r.device_id, &r.bundle_digest, Measure::from_record(r));
            if let Some(h) = &r.latency {
                m.insert_latency(&r.device_id, &r.bundle_digest, h.clone());
            }
        }
        m
    }

    /// Keeps a device's latency histogram of a bundle when it holds an observation.
    pub fn insert_latency(&mut self, device_id: &str, bundle_digest: &str, h: LatencyHistogram) {
        if h.count() > 0 {
            self.latency.entry(device_id.to_owned()).or_default().insert(bundle_digest.to_owned(), h);
        }
    }

    /// The device's latency histogram of the bundle, if it measured a request there.
    pub fn latency(&self, device_id: &str, bundle_digest: &str) -> Option<&LatencyHistogram> {
        self.latency.get(device_id)?.get(bundle_digest)
    }

    pub fn insert(&mut self, device_id: &str, bundle_digest: &str, measure: Measure) {
        if !measure.is_empty() {
            self.by_device.entry(device_id.to_owned()).or_default().insert(bundle_digest.to_owned(), measure);
        }
    }

    pub fn get(&self, device_id: &str, bundle_digest: &str) -> Option<Measure> {
        self.by_device.get(device_id)?.get(bundle_digest).copied()
    }

    /// The device's speed measurement of the bundle, if it measured one.
    pub fn speed(&self, device_id: &str, bundle_digest: &str) -> Option<Measure> {
        self.get(device_id, bundle_digest).filter(Measure::has_speed)
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty() && self.latency.is_empty()
    }
}

#[derive(Default)]
struct Sides {
    a_tps: Vec<f64>,
    b_tps: Vec<f64>,
    a_ttft: Vec<f64>,
    b_ttft: Vec<f64>,
    pair_tps: Vec<f64>,
    pair_ttft: Vec<f64>,
    a_devices: u32,
    b_devices: u32,
    paired: u32,
}

fn metric(a: &[f64], b: &[f64], pairs: &[f64], min_samples: usize) -> proto::MetricComparison {
    let (a, b, paired_ratio) = (stat(a), stat(b), stat(pairs));
    let ratio = if a.samples > 0 && b.samples > 0 && a.median > 0.0 { b.median / a.median } else { 0.0 };
    let min = min_samples.max(1) as u32;
    let gate_ratio = if paired_ratio.samples >= min {
        paired_ratio.median
    } else if a.samples >= min && b.samples >= min {
        ratio
    } else {
        0.0
    };
    proto::MetricComparison { a: Some(a), b: Some(b), ratio, paired_ratio: Some(paired_ratio), gate_ratio }
}

/// Compares a rollout's candidate with its baseline per hardware class. `records` are the rollout's
/// per-device records; `devices` the fleet (the rollout's selector picks the devices still on A).
pub fn compare<'a>(
    rollout: &proto::Rollout,
    devices: impl IntoIterator<Item = &'a proto::Device>,
    records: &[proto::RolloutDevice],
    m: &Measurements,
    min_samples: usize,
) -> proto::Comparison {
    let candidate = rollout.candidate.as_ref().map(|c| c.digest.clone()).unwrap_or_default();
    let mut classes: BTreeMap<String, Sides> = BTreeMap::new();
    let mut paired_devices = Vec::new();
    let in_b: HashSet<&str> = records.iter().map(|r| r.device_id.as_str()).collect();

    for r in records {
        if r.outcome == proto::DeviceOutcome::Reverted as i32 {
            continue;
        }
        let sides = classes.entry(r.class.clone()).or_default();
        let before = r.baseline.as_ref().and_then(|b| m.speed(&r.device_id, &b.digest));
        let after = m.speed(&r.device_id, &candidate);
        if let Some(a) = before {
            sides.a_devices += 1;
            sides.a_tps.extend(a.tokens_per_second);
            sides.a_ttft.extend(a.ttft_ms);
        }
        if let Some(b) = after {
            sides.b_devices += 1;
            sides.b_tps.extend(b.tokens_per_second);
            sides.b_ttft.extend(b.ttft_ms);
        }
        if let (Some(a), Some(b)) = (before, after) {
            sides.paired += 1;
            if let (Some(x), Some(y)) = (a.tokens_per_second, b.tokens_per_second)
                && x > 0.0
            {
                sides.pair_tps.push(y / x);
            }
            if let (Some(x), Some(y)) = (a.ttft_ms, b.ttft_ms)
                && x > 0.0
            {
                sides.pair_ttft.push(y / x);
            }
            paired_devices.push(proto::PairedDevice {
                device_id: r.device_id.clone(),
                class: r.class.clone(),
                a_tokens_per_second: a.tokens_per_second.unwrap_or(0.0),
                b_tokens_per_second: b.tokens_per_second.unwrap_or(0.0),
                a_ttft_ms: a.ttft_ms.unwrap_or(0.0),
                b_ttft_ms: b.ttft_ms.unwrap_or(0.0),
            });
        }
    }

    let selector = rollout.spec.as_ref().map(|s| &s.selector);
    for d in devices {
        if in_b.contains(d.id.as_str()) || !selector.is_some_and(|s| selects(s, &d.labels)) {
            continue;
        }
        let Some(running) = d.running.as_ref().map(|b| b.digest.as_str()).filter(|r| *r != candidate) else {
            continue;
        };
        if let Some(a) = m.speed(&d.id, running) {
            let sides = classes.entry(hardware_class(d)).or_default();
            sides.a_devices += 1;
            sides.a_tps.extend(a.tokens_per_second);
            sides.a_ttft.extend(a.ttft_ms);
        }
    }

    proto::Comparison {
        rollout_id: rollout.id.clone(),
        candidate: rollout.candidate.clone(),
        classes: classes
            .into_iter()
            .map(|(class, s)| proto::ClassComparison {
                class,
                generation_tokens_per_second: Some(metric(&s.a_tps, &s.b_tps, &s.pair_tps, min_samples)),
                ttft_ms: Some(metric(&s.a_ttft, &s.b_ttft, &s.pair_ttft, min_samples)),
                a_samples: s.a_devices,
                b_samples: s.b_devices,
                paired: s.paired,
                quality: None,
            })
            .collect(),
        devices: paired_devices,
    }
}

/// What the performance gates say about one class.
#[derive(Clone, Debug, PartialEq)]
pub enum PerfVerdict {
    /// No performance gate is set.
    Off,
    Pass(String),
    Fail(String),
    /// Too few samples on either side to judge; the text says what is missing.
    Unmeasured(String),
}

/// Judges a class's comparison against the rollout's performance gates (B relative to A).
pub fn judge(c: Option<&proto::ClassComparison>, gates: &proto::RolloutGates) -> PerfVerdict {
    if gates.min_tokens_per_second_ratio.is_none() && gates.max_ttft_ratio.is_none() {
        return PerfVerdict::Off;
    }
    let default = proto::ClassComparison::default();
    let c = c.unwrap_or(&default);
    let samples = format!("A {} / B {} devices, {} paired", c.a_samples, c.b_samples, c.paired);
    let mut values = Vec::new();
    let mut missing = Vec::new();
    let mut failed = None;
    if let Some(min) = gates.min_tokens_per_second_ratio {
        let r = c.generation_tokens_per_second.as_ref().map(|m| m.gate_ratio).unwrap_or(0.0);
        if r <= 0.0 {
            missing.push("tokens/s");
        } else {
            values.push(format!("tokens/s ratio {r:.2} (min {min:.2})"));
            if r < min {
                failed = Some(format!("tokens/s ratio {r:.2} < min {min:.2} ({samples})"));
            }
        }
    }
    if let Some(max) = gates.max_ttft_ratio {
        let r = c.ttft_ms.as_ref().map(|m| m.gate_ratio).unwrap_or(0.0);
        if r <= 0.0 {
            missing.push("time to first token");
        } else {
            values.push(format!("ttft ratio {r:.2} (max {max:.2})"));
            if r > max && failed.is_none() {
                failed = Some(format!("ttft ratio {r:.2} > max {max:.2} ({samples})"));
            }
        }
    }
    if let Some(why) = failed {
        PerfVerdict::Fail(why)
    } else if !missing.is_empty() {
        PerfVerdict::Unmeasured(format!("{} not measured on enough devices ({samples})", missing.join(" and ")))
    } else {
        PerfVerdict::Pass(values.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(d: &str) -> proto::BundleRef {
        proto::BundleRef { digest: d.into(), ..Default::default() }
    }

    fn rollout() -> proto::Rollout {
        proto::Rollout {
            id: "ro-1".into(),
            spec: Some(proto::RolloutSpec {
                selector: HashMap::from([("site".to_owned(), "lab".to_owned())]),
                ..Default::default()
            }),
            candidate: Some(bundle("sha256:bb")),
            ..Default::default()
        }
    }

    fn device(id: &str, class: &str) -> proto::Device {
        proto::Device {
            id: id.into(),
            labels: HashMap::from([("site".to_owned(), "lab".to_owned()), ("class".to_owned(), class.to_owned())]),
            running: Some(bundle("sha256:aa")),
            ..Default::default()
        }
    }

    fn record(id: &str, class: &str) -> proto::RolloutDevice {
        proto::RolloutDevice {
            device_id: id.into(),
            class: class.into(),
            baseline: Some(bundle("sha256:aa")),
            ..Default::default()
        }
    }

    fn measure(tps: f64, ttft: f64) -> Measure {
        Measure { tokens_per_second: Some(tps), ttft_ms: Some(ttft), traffic: None }
    }

    /// Ten pi devices and ten x86 devices; the first four of each moved to B. B is 30% slower on pi.
    fn fleet() -> (Vec<proto::Device>, Vec<proto::RolloutDevice>, Measurements) {
        let mut devices = Vec::new();
        let mut records = Vec::new();
        let mut m = Measurements::default();
        for (class, base, b_factor) in [("pi5-8g", 10.0, 0.7), ("x86-avx2", 40.0, 1.05)] {
            for i in 0..10 {
                let id = format!("{class}-{i}");
                devices.push(device(&id, class));
                let own = base + i as f64; // devices differ; pairing removes that
                m.insert(&id, "sha256:aa", measure(own, 200.0));
                if i < 4 {
                    records.push(record(&id, class));
                    m.insert(&id, "sha256:bb", measure(own * b_factor, 200.0 / b_factor));
                }
            }
        }
        (devices, records, m)
    }

    #[test]
    fn per_class_medians_pairs_and_gate_ratios() {
        let (devices, records, m) = fleet();
        let c = compare(&rollout(), &devices, &records, &m, 3);
        assert_eq!(c.classes.len(), 2);
        let pi = &c.classes[0];
        assert_eq!((pi.class.as_str(), pi.a_samples, pi.b_samples, pi.paired), ("pi5-8g", 10, 4, 4));
        let tps = pi.generation_tokens_per_second.as_ref().expect("tps");
        assert!((tps.gate_ratio - 0.7).abs() < 1e-9, "paired ratio is exact: {}", tps.gate_ratio);
        assert_eq!(tps.a.as_ref().map(|s| s.samples), Some(10));
        assert!(tps.ratio < 0.7, "the unpaired ratio is skewed by which devices went to B: {}", tps.ratio);
        assert_eq!(c.devices.len(), 8);
        let x86 = &c.classes[1];
        assert!((x86.generation_tokens_per_second.as_ref().expect("tps").gate_ratio - 1.05).abs() < 1e-9);
    }

    #[test]
    fn gates_pass_fail_and_unmeasured() {
        let (devices, records, m) = fleet();
        let c = compare(&rollout(), &devices, &records, &m, 3);
        let gates = proto::RolloutGates {
            min_tokens_per_second_ratio: Some(0.9),
            max_ttft_ratio: Some(1.2),
            ..Default::default()
        };
        assert!(
            matches!(judge(Some(&c.classes[0]), &gates), PerfVerdict::Fail(why) if why.contains("tokens/s ratio 0.70"))
        );
        assert!(matches!(judge(Some(&c.classes[1]), &gates), PerfVerdict::Pass(_)));
        assert_eq!(judge(Some(&c.classes[1]), &proto::RolloutGates::default()), PerfVerdict::Off);
        // Five devices needed: four pairs are not enough, and B has only four devices.
        let c = compare(&rollout(), &devices, &records, &m, 5);
        assert!(matches!(judge(Some(&c.classes[0]), &gates), PerfVerdict::Unmeasured(_)));
        assert!(matches!(judge(None, &gates), PerfVerdict::Unmeasured(_)));
    }

    #[test]
    fn reverted_devices_and_devices_outside_the_selector_are_left_out() {
        let (mut devices, mut records, m) = fleet();
        records[0].outcome = proto::DeviceOutcome::Reverted as i32;
        devices[9].labels.insert("site".into(), "elsewhere".into());
        let c = compare(&rollout(), &devices, &records, &m, 1);
        assert_eq!((c.classes[0].a_samples, c.classes[0].b_samples), (8, 3));
    }

    #[test]
    fn a_benchmark_wins_over_telemetry() {
        let r = PerfRecord {
            benchmark_tokens_per_second: Some(12.0),
            tokens_per_second: vec![1.0, 2.0, 3.0],
            ttft_ms: vec![5.0, 7.0, 6.0],
            ..Default::default()
        };
        assert_eq!(Measure::from_record(&r), measure(12.0, 6.0));
    }
}
