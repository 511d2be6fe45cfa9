//! The p95 latency gate under the engine: a class whose candidate is slower than the ratio allows is halted
//! with both p95 values named, one as fast completes; the class waits for a latency sample from every
//! active candidate device (telemetry without requests is none) until their deadline, and holds for a human
//! when A was never measured.

use super::*;
use crate::store::LatencyHistogram;

/// Bounds like the agent's first ones (ms).
const BOUNDS: [f64; 8] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// 100 requests, all in the bucket ending at `upper` (one of [`BOUNDS`]).
fn requests_under(upper: f64) -> LatencyHistogram {
    let cumulative = BOUNDS.iter().map(|b| if *b >= upper { 100 } else { 0 }).chain([100]).collect();
    LatencyHistogram { bounds_ms: BOUNDS.to_vec(), cumulative, sum_ms: 0.0 }
}

/// Two classes of 30 devices; each served A in (100, 250] ms; the gate allows B 1.5x A's p95.
fn latency_sim(policy: ClassFailurePolicy) -> Sim {
    let mut r = gated(&[(20, 0), (100, 0)], policy);
    if let Some(spec) = r.spec.as_mut() {
        spec.on_inconclusive = InconclusivePolicy::Hold as i32;
        if let Some(g) = spec.gates.as_mut() {
            g.max_p95_latency_ratio = Some(1.5);
        }
    }
    let mut sim = Sim::new(r, fleet(60, &["pi5", "orin"]));
    for d in &sim.devices {
        sim.measurements.insert_latency(&d.id, "sha256:aa", requests_under(250.0));
    }
    sim
}

/// Runs the rollout; a device of a class in `b_upper` reports requests on B, all under that bound, as soon
/// as it is active on B (a class not there reports none).
fn run_serving(sim: &mut Sim, b_upper: &[(&str, f64)], from: i64, until: i64) {
    let mut now = from;
    while now <= until && is_active(sim.state()) && sim.state() != RolloutState::Paused {
        sim.step(now);
        let on_b: Vec<(String, String)> = sim
            .in_b()
            .iter()
            .filter(|d| d.running.as_ref().is_some_and(|b| b.digest == "sha256:bb"))
            .map(|d| (d.id.clone(), d.labels["class"].clone()))
            .collect();
        for (id, class) in on_b {
            if let Some((_, upper)) = b_upper.iter().find(|(c, _)| *c == class) {
                sim.measurements.insert_latency(&id, "sha256:bb", requests_under(*upper));
            }
        }
        now += 1_000;
    }
}

fn class<'a>(sim: &'a Sim, name: &str) -> &'a proto::ClassStatus {
    sim.rollout.classes.iter().find(|c| c.class == name).expect("class listed")
}

#[test]
fn a_class_slower_than_the_ratio_allows_is_halted_with_both_p95_values_and_one_as_fast_completes() {
    let mut sim = latency_sim(ClassFailurePolicy::HaltClass);
    // pi5's B answers in (250, 500] ms (p95 487.5 against A's 242.5: 2.01x); orin's as fast as A.
    run_serving(&mut sim, &[("pi5", 500.0), ("orin", 250.0)], 0, 100_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["pi5".to_owned()]);
    let halt = sim.events.iter().find(|e| e.kind == "class_halted").expect("halt event");
    assert!(
        halt.message.contains("p95 latency 488 ms on B is 2.01x A's 242 ms, over the gate 1.5x"),
        "{}",
        halt.message
    );
    let orin = class(&sim, "orin");
    assert_eq!(orin.verdict, GateVerdict::Pass as i32, "{}", orin.reason);
    assert_eq!((orin.a_p95_latency_ms, orin.b_p95_latency_ms), (242.5, 242.5));
    assert!(orin.reason.contains("p95 latency 242 ms (A 242 ms, max 1.5x)"), "{}", orin.reason);
    for d in &sim.devices {
        let on_b = d.running.as_ref().is_some_and(|b| b.digest == "sha256:bb");
        assert_eq!(on_b, d.labels["class"] == "orin", "{}", d.id);
    }
}

#[test]
fn a_slower_candidate_aborts_under_the_abort_policy_and_every_device_returns_to_a() {
    let mut sim = latency_sim(ClassFailurePolicy::Abort);
    run_serving(&mut sim, &[("pi5", 1000.0), ("orin", 250.0)], 0, 100_000);
    assert_eq!(sim.state(), RolloutState::Aborted);
    assert!(
        sim.rollout.message.contains("pi5: p95 latency 975 ms on B is 4.02x A's 242 ms"),
        "{}",
        sim.rollout.message
    );
    assert!(sim.in_b().is_empty());
}

#[test]
fn the_gate_waits_for_a_latency_sample_from_every_active_device_until_their_deadline() {
    // B devices report telemetry, but no request finished yet: no sample, the class waits.
    let mut sim = latency_sim(ClassFailurePolicy::Abort);
    run_serving(&mut sim, &[], 0, 10_000);
    assert_eq!(sim.state(), RolloutState::Progressing);
    assert_eq!(sim.rollout.current_step, 0);
    assert!(sim.rollout.message.contains("waiting for latency samples from"), "{}", sim.rollout.message);
    // pi5's devices get requests; orin's still wait.
    run_serving(&mut sim, &[("pi5", 250.0)], 11_000, 20_000);
    assert_eq!(class(&sim, "pi5").verdict, GateVerdict::Pass as i32, "{}", class(&sim, "pi5").reason);
    assert_eq!(class(&sim, "orin").verdict, GateVerdict::Waiting as i32);
    assert_eq!(class(&sim, "orin").b_p95_latency_ms, 0.0, "nothing measured on B");

    // With a deadline, devices still without a sample are judged without once it passed: too few, held.
    if let Some(spec) = sim.rollout.spec.as_mut() {
        spec.device_deadline_seconds = 60;
    }
    run_serving(&mut sim, &[("pi5", 250.0)], 21_000, 100_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("orin: p95 latency not measured"), "{}", sim.rollout.message);
}

#[test]
fn an_unmeasured_a_holds_the_class_for_a_human() {
    let mut sim = latency_sim(ClassFailurePolicy::Abort);
    sim.measurements = Measurements::default();
    run_serving(&mut sim, &[("pi5", 250.0), ("orin", 250.0)], 0, 20_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("held for a human, inconclusive"), "{}", sim.rollout.message);
    assert!(
        sim.rollout.message.contains("p95 latency not measured: no requests on both sides"),
        "{}",
        sim.rollout.message
    );
}
