//! Serving errors of a rollout's candidate B against its baseline A per hardware class, from the front
//! proxy's per-bundle request and error counters: the error-rate gate's math. Pure: the rollout engine
//! calls it with the devices' [`Measurements`].
//!
//! # Rules
//!
//! - **B**: the rollout's candidate devices (not returned to A) with traffic on the candidate. **A**: the
//!   same devices' traffic on their baseline before the swap, plus selected devices still on A, on what
//!   they run (the sides `insight::compare` uses for speed).
//! - A side's error rate is its errors over its requests, pooled over its devices; a device is a sample
//!   of a side once it served a request there.
//! - The gate judges once each side has `min_samples` samples; until then it is unmeasured (the engine
//!   waits for candidate devices that have not reported telemetry of B yet, else holds as inconclusive).
//! - B **fails** when its rate exceeds `max_error_rate_ratio` × A's rate, where A's rate counts at least
//!   one error over A's requests: an A that happened to see no error does not fail a class on B's first
//!   error, while a B failing far more often than that still does.

use std::collections::{BTreeMap, HashSet};

use alki_shared::proto;

use super::compare::{Measurements, PerfVerdict};
use crate::facts::{hardware_class, selects};
use crate::store::Traffic;

/// One side's pooled traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side {
    /// Devices that served at least one request.
    pub devices: u32,
    pub requests: u64,
    pub errors: u64,
}

impl Side {
    fn add(&mut self, t: Traffic) {
        if t.requests > 0 {
            self.devices += 1;
            self.requests = self.requests.saturating_add(t.requests);
            self.errors = self.errors.saturating_add(t.errors.min(t.requests));
        }
    }

    /// Errors / requests; None without requests.
    pub fn rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

/// A class's traffic on both sides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassErrors {
    pub a: Side,
    pub b: Side,
}

/// Each class's A and B traffic (see the module documentation for who counts on which side).
pub fn per_class<'a>(
    rollout: &proto::Rollout,
    devices: impl IntoIterator<Item = &'a proto::Device>,
    records: &[proto::RolloutDevice],
    m: &Measurements,
) -> BTreeMap<String, ClassErrors> {
    let candidate = rollout.candidate.as_ref().map(|c| c.digest.as_str()).unwrap_or_default();
    let traffic = |device: &str, bundle: &str| m.get(device, bundle).and_then(|x| x.traffic);
    let mut classes: BTreeMap<String, ClassErrors> = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome != proto::DeviceOutcome::Reverted as i32) {
        let class = classes.entry(r.class.clone()).or_default();
        if let Some(t) = r.baseline.as_ref().and_then(|b| traffic(&r.device_id, &b.digest)) {
            class.a.add(t);
        }
        if let Some(t) = traffic(&r.device_id, candidate) {
            class.b.add(t);
        }
    }
    let in_b: HashSet<&str> = records.iter().map(|r| r.device_id.as_str()).collect();
    let selector = rollout.spec.as_ref().map(|s| &s.selector);
    for d in devices {
        if in_b.contains(d.id.as_str()) || !selector.is_some_and(|s| selects(s, &d.labels)) {
            continue;
        }
        let running = d.running.as_ref().map(|b| b.digest.as_str()).filter(|r| *r != candidate);
        if let Some(t) = running.and_then(|r| traffic(&d.id, r)) {
            classes.entry(hardware_class(d)).or_default().a.add(t);
        }
    }
    classes
}

/// Judges a class's traffic against `max_ratio` (None: the gate is off).
pub fn judge(c: Option<&ClassErrors>, max_ratio: Option<f64>, min_samples: usize) -> PerfVerdict {
    let Some(max) = max_ratio else { return PerfVerdict::Off };
    let c = c.copied().unwrap_or_default();
    let min = min_samples.max(1) as u32;
    let counts = format!(
        "A {} errors / {} requests on {} devices, B {} / {} on {}",
        c.a.errors, c.a.requests, c.a.devices, c.b.errors, c.b.requests, c.b.devices
    );
    let (Some(a), Some(b)) = (c.a.rate(), c.b.rate()) else {
        return PerfVerdict::Unmeasured(format!("error rate not measured: no traffic on both sides ({counts})"));
    };
    if c.a.devices < min || c.b.devices < min {
        return PerfVerdict::Unmeasured(format!("error rate measured on too few devices, {min} needed ({counts})"));
    }
    let floor = a.max(1.0 / c.a.requests as f64);
    let limit = max * floor;
    if b > limit {
        PerfVerdict::Fail(format!(
            "error rate {b:.4} > max {limit:.4} (--max-error-rate-ratio {max} x A's {floor:.4}; {counts})"
        ))
    } else {
        PerfVerdict::Pass(format!("error rate {b:.4} (A {a:.4}, max {limit:.4})"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::insight::compare::Measure;

    fn bundle(d: &str) -> proto::BundleRef {
        proto::BundleRef { digest: d.into(), ..Default::default() }
    }

    fn traffic(requests: u64, errors: u64) -> Measure {
        Measure { traffic: Some(Traffic { requests, errors }), ..Default::default() }
    }

    /// Four devices of one class in B, two more selected and still on A.
    fn fleet(b_errors: u64) -> (proto::Rollout, Vec<proto::Device>, Vec<proto::RolloutDevice>, Measurements) {
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
        for i in 0..6 {
            let id = format!("d{i}");
            devices.push(proto::Device {
                id: id.clone(),
                labels: HashMap::from([("site".to_owned(), "lab".to_owned()), ("class".to_owned(), "pi".to_owned())]),
                running: Some(bundle(if i < 4 { "sha256:bb" } else { "sha256:aa" })),
                ..Default::default()
            });
            m.insert(&id, "sha256:aa", traffic(1000, 1));
            if i < 4 {
                records.push(proto::RolloutDevice {
                    device_id: id.clone(),
                    class: "pi".into(),
                    baseline: Some(bundle("sha256:aa")),
                    ..Default::default()
                });
                m.insert(&id, "sha256:bb", traffic(500, b_errors));
            }
        }
        (rollout, devices, records, m)
    }

    #[test]
    fn b_failing_more_often_than_a_fails_the_gate_with_its_counts() {
        let (rollout, devices, records, m) = fleet(10);
        let classes = per_class(&rollout, &devices, &records, &m);
        let pi = classes["pi"];
        assert_eq!((pi.a.devices, pi.a.requests, pi.a.errors), (6, 6000, 6));
        assert_eq!((pi.b.devices, pi.b.requests, pi.b.errors), (4, 2000, 40));
        let PerfVerdict::Fail(why) = judge(Some(&pi), Some(2.0), 3) else { panic!("B fails 20x as often") };
        assert!(why.starts_with("error rate 0.0200 > max 0.0020"), "{why}");
        assert!(why.contains("A 6 errors / 6000 requests on 6 devices, B 40 / 2000 on 4"), "{why}");
        assert!(matches!(judge(Some(&pi), Some(30.0), 3), PerfVerdict::Pass(_)));
        assert_eq!(judge(Some(&pi), None, 3), PerfVerdict::Off);
        assert!(matches!(judge(Some(&pi), Some(2.0), 5), PerfVerdict::Unmeasured(why) if why.contains("5 needed")));
        assert!(matches!(judge(None, Some(2.0), 1), PerfVerdict::Unmeasured(_)));
    }

    #[test]
    fn an_a_without_errors_still_leaves_room_for_one() {
        let (rollout, devices, records, mut m) = fleet(1);
        for i in 0..6 {
            m.insert(&format!("d{i}"), "sha256:aa", traffic(1000, 0));
        }
        let classes = per_class(&rollout, &devices, &records, &m);
        // B: 1 error per 500 requests on each device (0.002); A: none in 6000, counted as 1 / 6000.
        assert!(matches!(judge(classes.get("pi"), Some(20.0), 1), PerfVerdict::Pass(_)));
        assert!(matches!(judge(classes.get("pi"), Some(2.0), 1), PerfVerdict::Fail(_)));
    }
}
