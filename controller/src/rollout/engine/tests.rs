//! Engine tests with a fake clock: unit scenarios and property tests of cohorts, gates and abort.

use super::*;
use crate::insight::compare::Measure;
use crate::store::{EvalSample, Record, Traffic};
use alki_shared::eval::quality::Outcome;
use proptest::prelude::*;
use std::collections::BTreeSet;

mod latency;
mod quality;

pub(super) fn device_id(id: &str) -> DeviceId {
    DeviceId::new(id).expect("device id")
}

fn rollout_id(id: &str) -> RolloutId {
    RolloutId::new(id).expect("rollout id")
}

/// Records with their ids checked, as the store hands them to the reconciler.
fn keyed<T: Record + Clone>(records: &[T]) -> Vec<Keyed<T>> {
    records.iter().map(|r| Keyed::new(r.clone()).expect("a valid id")).collect()
}

fn keyed_rollout(rollout: &proto::Rollout) -> Keyed<proto::Rollout> {
    Keyed::new(rollout.clone()).expect("a valid rollout id")
}

pub(super) fn rollout(steps: &[(u32, u32)]) -> proto::Rollout {
    proto::Rollout {
        id: "ro-1".into(),
        spec: Some(proto::RolloutSpec {
            repository: "acme/tiny".into(),
            candidate: "v2".into(),
            selector: HashMap::from([("site".to_owned(), "lab".to_owned())]),
            steps: steps
                .iter()
                .map(|&(percent, min_soak_seconds)| proto::RolloutStep { percent, min_soak_seconds })
                .collect(),
            ..Default::default()
        }),
        candidate: Some(bundle("sha256:bb")),
        state: RolloutState::Pending as i32,
        ..Default::default()
    }
}

fn bundle(digest: &str) -> proto::BundleRef {
    proto::BundleRef { repository: "acme/tiny".into(), digest: digest.into(), ..Default::default() }
}

fn device(id: &str, site: &str, class: &str) -> proto::Device {
    proto::Device {
        id: id.into(),
        labels: HashMap::from([("site".to_owned(), site.to_owned()), ("class".to_owned(), class.to_owned())]),
        running: Some(bundle("sha256:aa")),
        desired: Some(bundle("sha256:aa")),
        desired_runtime: Some(proto::RuntimeSettings { context_size: 1024, ..Default::default() }),
        desired_generation: 1,
        applied_generation: 1,
        phase: Phase::Active as i32,
        connected: true,
        ..Default::default()
    }
}

/// A simulated fleet under the engine: applies plans the way the reconciler and agents would.
struct Sim {
    rollout: proto::Rollout,
    devices: Vec<proto::Device>,
    records: Vec<proto::RolloutDevice>,
    events: Vec<proto::RolloutEvent>,
    /// Devices that fail activation of B.
    failing: HashSet<String>,
    /// Devices that never report (offline).
    offline: HashSet<String>,
    /// Measurements the devices reported; with `b_speed` set, a device that activates B reports its
    /// measurement of B at once: its A value times its class's factor.
    measurements: Measurements,
    b_speed: HashMap<String, f64>,
    /// Devices whose pre-staging fails (the others answer ready at once).
    stage_failing: HashSet<String>,
    /// Every Prestage command sent, as (device, attempt, now).
    prestaged: Vec<(String, u32, i64)>,
    /// What a device of each class that activates B reports of its evaluation (none for a class not here).
    quality: HashMap<String, Outcome>,
    /// Devices that never report an evaluation.
    silent: HashSet<String>,
    /// The evaluations reported so far.
    evaluations: Vec<EvalSample>,
    /// What a device of each class that activates B reports of its traffic on B.
    b_traffic: HashMap<String, Traffic>,
}

impl Sim {
    fn new(rollout: proto::Rollout, devices: Vec<proto::Device>) -> Sim {
        Sim {
            rollout,
            devices,
            records: Vec::new(),
            events: Vec::new(),
            failing: HashSet::new(),
            offline: HashSet::new(),
            measurements: Measurements::default(),
            b_speed: HashMap::new(),
            stage_failing: HashSet::new(),
            prestaged: Vec::new(),
            quality: HashMap::new(),
            silent: HashSet::new(),
            evaluations: Vec::new(),
            b_traffic: HashMap::new(),
        }
    }

    fn apply(&mut self, plan: Plan) {
        self.apply_at(plan, 0);
    }

    fn apply_at(&mut self, plan: Plan, now: i64) {
        for order in &plan.prestage {
            self.prestaged.push((order.device_id.to_string(), order.attempt, now));
            let Some(d) = self.devices.iter_mut().find(|d| order.device_id.as_str() == d.id) else { continue };
            let state = if self.stage_failing.contains(&d.id) {
                proto::PrestageState::Failed
            } else {
                proto::PrestageState::Ready
            };
            d.prestage = Some(proto::DevicePrestage {
                rollout_id: plan.rollout.id.clone(),
                bundle: plan.rollout.candidate.clone(),
                state: state as i32,
                attempts: order.attempt,
                sent_unix_ms: now,
                ..Default::default()
            });
        }
        for r in plan.records.iter().map(Keyed::record) {
            match self.records.iter_mut().find(|x| x.device_id == r.device_id) {
                Some(x) => *x = r.clone(),
                None => self.records.push(r.clone()),
            }
        }
        self.events.extend(plan.events.iter().cloned());
        let candidate = plan.rollout.candidate.clone();
        let id = plan.rollout.id.clone();
        for d in self.devices.iter_mut() {
            let named = |ids: &[DeviceId]| ids.iter().any(|id| id.as_str() == d.id);
            let to_b = named(&plan.to_candidate) || named(&plan.retry);
            let to_a = plan.to_baseline.iter().find(|r| r.device_id.as_str() == d.id);
            if to_b {
                d.rollout_id = id.clone();
                d.cohort = COHORT_CANDIDATE.into();
                d.desired = candidate.clone();
                d.desired_generation += 1;
            } else if let Some(r) = to_a {
                d.rollout_id = id.clone();
                d.cohort = COHORT_BASELINE.into();
                d.desired = r.bundle.clone();
                d.desired_serve_nothing = r.bundle.is_none();
                d.desired_runtime = Some(r.runtime);
                d.desired_generation += 1;
            } else {
                continue;
            }
            if self.offline.contains(&d.id) {
                continue;
            }
            // The agent converges at once.
            d.applied_generation = d.desired_generation;
            if to_b && self.failing.contains(&d.id) {
                d.phase = Phase::Failed as i32;
                d.error =
                    Some(proto::ActivationError { code: proto::ErrorCode::StartFailed as i32, ..Default::default() });
            } else {
                d.phase = Phase::Active as i32;
                d.error = None;
                d.running = d.desired.clone();
                let running = d.running.as_ref().map(|b| b.digest.clone()).unwrap_or_default();
                let class = d.labels["class"].clone();
                let (a, factor) = (self.measurements.get(&d.id, "sha256:aa"), self.b_speed.get(&class));
                let mut b = crate::insight::compare::Measure::default();
                if let (true, Some(a), Some(f)) = (to_b, a, factor) {
                    b.tokens_per_second = a.tokens_per_second.map(|v| v * f);
                    b.ttft_ms = a.ttft_ms.map(|v| v / f);
                }
                if to_b {
                    b.traffic = self.b_traffic.get(&class).copied();
                    self.measurements.insert(&d.id, &running, b);
                }
                if let (true, Some(outcome), false) = (to_b, self.quality.get(&class), self.silent.contains(&d.id)) {
                    self.evaluations.push(EvalSample {
                        device_id: d.id.clone(),
                        class,
                        variant_digest: "sha256:bbv".into(),
                        baseline_bundle: "sha256:aa".into(),
                        baseline_variant: String::new(),
                        rollout_id: id.clone(),
                        received_unix_ms: now,
                        outcome: outcome.clone(),
                    });
                }
            }
        }
        self.rollout = plan.rollout;
    }

    fn step(&mut self, now: i64) -> Plan {
        let other = HashSet::new();
        let evaluations = Evaluations::from_samples(self.evaluations.clone());
        let facts = Facts {
            devices: &keyed(&self.devices),
            records: &keyed(&self.records),
            other_active: &other,
            measurements: &self.measurements,
            evaluations: &evaluations,
        };
        let plan = decide(&keyed_rollout(&self.rollout), &facts, UnixMs(now));
        self.apply_at(plan.clone(), now);
        plan
    }

    /// An operator's verb on the rollout as it is now.
    fn command(&self, verb: Verb, reason: &str, now: i64) -> Result<Plan, VerbError> {
        command(&keyed_rollout(&self.rollout), &keyed(&self.records), verb, reason, UnixMs(now))
    }

    fn state(&self) -> RolloutState {
        RolloutState::try_from(self.rollout.state).unwrap_or_default()
    }

    fn run(&mut self, from: i64, until: i64, tick: i64) -> i64 {
        let mut now = from;
        while now <= until && is_active(self.state()) && self.state() != RolloutState::Paused {
            self.step(now);
            now += tick;
        }
        now
    }

    fn in_b(&self) -> Vec<&proto::Device> {
        self.devices.iter().filter(|d| d.cohort == COHORT_CANDIDATE).collect()
    }
}

fn fleet(n: usize, classes: &[&str]) -> Vec<proto::Device> {
    (0..n).map(|i| device(&format!("d{i:04}"), "lab", classes[i % classes.len()])).collect()
}

#[test]
fn a_healthy_four_step_rollout_soaks_and_completes() {
    let mut sim = Sim::new(rollout(&[(5, 60), (25, 60), (50, 60), (100, 0)]), fleet(200, &["pi5", "orin"]));
    let mut seen_steps = Vec::new();
    let mut now = 0;
    while is_active(sim.state()) && now < 1_000_000 {
        sim.step(now);
        seen_steps.push(sim.rollout.current_step);
        now += 10_000;
    }
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    seen_steps.dedup();
    assert_eq!(seen_steps, vec![0, 1, 2, 3]);
    assert!(now >= 180_000, "each step soaked 60 s: {now}");
    assert_eq!(sim.in_b().len(), 200);
    let kinds: Vec<&str> = sim.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["started", "advanced", "advanced", "advanced", "completed"]);
    let seqs: Vec<u64> = sim.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=5).collect::<Vec<_>>());
}

#[test]
fn failures_without_a_failure_gate_hold_the_step() {
    let mut sim = Sim::new(rollout(&[(100, 0)]), vec![device("a", "lab", "x")]);
    sim.failing.insert("a".into());
    sim.step(0);
    sim.step(1);
    assert_eq!(sim.state(), RolloutState::Progressing);
    assert_eq!(sim.rollout.counts.map(|c| c.failed), Some(1));
    assert!(sim.rollout.message.contains("failed"), "{}", sim.rollout.message);
    assert!(
        sim.events
            .iter()
            .any(|e| e.kind == "device_failed" && e.device_id == "a" && e.message.contains("start_failed"))
    );
}

fn gated(steps: &[(u32, u32)], policy: ClassFailurePolicy) -> proto::Rollout {
    let mut r = rollout(steps);
    if let Some(spec) = r.spec.as_mut() {
        spec.gates = Some(proto::RolloutGates { min_devices: 3, max_failure_ratio: Some(0.05), ..Default::default() });
        spec.on_class_failure = policy as i32;
        spec.on_inconclusive = InconclusivePolicy::Advance as i32;
    }
    r
}

#[test]
fn a_failing_candidate_aborts_and_every_b_device_returns_to_exactly_its_a() {
    let mut devices = fleet(100, &["pi5"]);
    // Devices ran different A bundles with different runtimes: each must get its own back.
    for (i, d) in devices.iter_mut().enumerate() {
        let a = bundle(&format!("sha256:a{}", i % 3));
        d.running = Some(a.clone());
        d.desired = Some(a);
        d.desired_runtime =
            Some(proto::RuntimeSettings { context_size: 512 * (i as u32 % 3 + 1), ..Default::default() });
    }
    let before: HashMap<String, (Option<proto::BundleRef>, Option<proto::RuntimeSettings>)> =
        devices.iter().map(|d| (d.id.clone(), (d.running.clone(), d.desired_runtime))).collect();
    let mut sim = Sim::new(gated(&[(20, 0), (50, 0), (100, 0)], ClassFailurePolicy::Abort), devices);
    sim.failing = sim.devices.iter().step_by(10).map(|d| d.id.clone()).collect();
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Aborted, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("failure ratio"), "{}", sim.rollout.message);
    assert!(sim.in_b().is_empty(), "no device stays in B");
    for d in &sim.devices {
        let (running, runtime) = &before[&d.id];
        assert_eq!(&d.running, running, "{} runs its A", d.id);
        if d.cohort == COHORT_BASELINE {
            assert_eq!(d.desired_runtime, *runtime, "{} gets its A runtime back", d.id);
        }
    }
    assert!(sim.events.iter().any(|e| e.kind == "aborted"));
    // Deciding again changes nothing.
    let other = HashSet::new();
    let facts = Facts {
        devices: &keyed(&sim.devices),
        records: &keyed(&sim.records),
        other_active: &other,
        measurements: &Measurements::default(),
        evaluations: &Evaluations::default(),
    };
    assert!(!decide(&keyed_rollout(&sim.rollout), &facts, UnixMs(200_000)).changes(&sim.rollout));
}

#[test]
fn a_failing_class_is_halted_while_the_others_complete() {
    let mut sim =
        Sim::new(gated(&[(20, 0), (100, 0)], ClassFailurePolicy::HaltClass), fleet(120, &["pi5", "orin", "x86"]));
    sim.failing = sim.devices.iter().filter(|d| d.labels["class"] == "orin").map(|d| d.id.clone()).collect();
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["orin".to_owned()]);
    for d in &sim.devices {
        let class = d.labels["class"].as_str();
        let on_b = d.running.as_ref().is_some_and(|b| b.digest == "sha256:bb");
        assert_eq!(on_b, class != "orin", "{} ({class})", d.id);
    }
    let orin = sim.rollout.classes.iter().find(|c| c.class == "orin").expect("orin listed");
    assert_eq!(orin.verdict, GateVerdict::Halted as i32);
    assert!(sim.events.iter().any(|e| e.kind == "class_halted" && e.message.contains("orin")));
}

#[test]
fn a_halted_class_without_baselines_reports_each_failure_once() {
    let mut devices = fleet(60, &["pi5", "orin"]);
    for d in devices.iter_mut() {
        d.running = None;
        d.desired = None;
    }
    let mut sim = Sim::new(gated(&[(30, 0), (100, 0)], ClassFailurePolicy::HaltClass), devices);
    sim.failing = sim.devices.iter().filter(|d| d.labels["class"] == "orin").map(|d| d.id.clone()).collect();
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["orin".to_owned()]);
    let mut failed: Vec<&str> =
        sim.events.iter().filter(|e| e.kind == "device_failed").map(|e| e.device_id.as_str()).collect();
    let n = failed.len();
    failed.sort_unstable();
    failed.dedup();
    assert_eq!(failed.len(), n, "each failure is one event");
}

#[test]
fn offline_devices_are_pending_until_the_deadline_then_fail() {
    let mut r = gated(&[(100, 0)], ClassFailurePolicy::Abort);
    if let Some(spec) = r.spec.as_mut() {
        spec.device_deadline_seconds = 60;
        spec.gates = Some(proto::RolloutGates { max_failures: Some(0), ..Default::default() });
    }
    let mut sim = Sim::new(r, fleet(10, &["pi5"]));
    sim.offline.insert("d0003".into());
    sim.step(0);
    sim.step(30_000);
    assert_eq!(sim.state(), RolloutState::Progressing);
    assert_eq!(sim.rollout.counts.map(|c| (c.active, c.pending, c.failed)), Some((9, 1, 0)));
    sim.step(60_000);
    assert_eq!(sim.state(), RolloutState::Aborted, "{}", sim.rollout.message);
    let rec = sim.records.iter().find(|r| r.device_id == "d0003").expect("record");
    assert_eq!(rec.reason, "deadline");
}

#[test]
fn decommissioned_devices_leave_the_rollout_and_its_gates() {
    let mut r = gated(&[(100, 0)], ClassFailurePolicy::Abort);
    if let Some(spec) = r.spec.as_mut() {
        spec.device_deadline_seconds = 60;
        spec.gates = Some(proto::RolloutGates { max_failures: Some(0), ..Default::default() });
    }
    let mut devices = fleet(10, &["pi5"]);
    devices[0].decommissioned = true;
    let mut sim = Sim::new(r, devices);
    // A member that goes offline for good and is then decommissioned must not fail the rollout at its
    // deadline, nor be waited for.
    sim.offline.insert("d0003".into());
    sim.step(0);
    sim.step(1_000);
    assert!(sim.records.iter().all(|r| r.device_id != "d0000"), "a decommissioned device is never selected");
    assert_eq!(sim.rollout.counts.map(|c| (c.selected, c.active, c.pending)), Some((9, 8, 1)));
    if let Some(d) = sim.devices.iter_mut().find(|d| d.id == "d0003") {
        d.decommissioned = true;
    }
    sim.step(60_000);
    sim.step(61_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.counts.map(|c| (c.selected, c.active, c.failed)), Some((8, 8, 0)));
}

#[test]
fn max_concurrent_bounds_devices_converging_at_once() {
    let mut r = rollout(&[(100, 0)]);
    if let Some(spec) = r.spec.as_mut() {
        spec.max_concurrent = 4;
    }
    let mut sim = Sim::new(r, fleet(20, &["pi5"]));
    sim.offline = sim.devices.iter().map(|d| d.id.clone()).collect();
    let plan = sim.step(0);
    assert_eq!(plan.to_candidate.len(), 4);
    let plan = sim.step(1);
    assert!(plan.to_candidate.is_empty(), "4 still converging");
    assert_eq!(sim.rollout.counts.map(|c| (c.candidate, c.pending)), Some((20, 20)));
    sim.offline.clear();
    for d in sim.devices.iter_mut().filter(|d| d.cohort == COHORT_CANDIDATE) {
        d.applied_generation = d.desired_generation;
        d.running = d.desired.clone();
    }
    let plan = sim.step(2);
    assert_eq!(plan.to_candidate.len(), 4, "the next four get their turn");
}

#[test]
fn devices_joining_mid_rollout_get_the_current_steps_cohort() {
    let mut sim = Sim::new(rollout(&[(50, 0), (100, 1_000)]), fleet(40, &["pi5"]));
    sim.run(0, 5_000, 1_000);
    assert_eq!(sim.rollout.current_step, 1, "{}", sim.rollout.message);
    sim.devices.push(device("late", "lab", "pi5"));
    sim.step(10_000);
    assert!(sim.in_b().iter().any(|d| d.id == "late"), "at 100% the newcomer joins B");
    sim.devices.push(device("elsewhere", "shop", "pi5"));
    sim.step(11_000);
    assert!(!sim.in_b().iter().any(|d| d.id == "elsewhere"), "outside the selector");
}

#[test]
fn inconclusive_classes_hold_for_a_human_and_resume_accepts_the_step() {
    let mut r = rollout(&[(100, 0)]);
    if let Some(spec) = r.spec.as_mut() {
        spec.gates = Some(proto::RolloutGates { min_devices: 5, max_failure_ratio: Some(0.5), ..Default::default() });
    }
    let mut sim = Sim::new(r, fleet(3, &["pi5"]));
    sim.step(0);
    sim.step(1);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.pause_reason, PauseReason::Inconclusive as i32);
    assert!(sim.rollout.message.contains("pi5"), "{}", sim.rollout.message);
    let plan = sim.command(Verb::Resume, "looked fine", 2).expect("resume");
    sim.apply(plan);
    sim.step(3);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
}

#[test]
fn operator_verbs_have_explicit_transitions() {
    let mut sim = Sim::new(rollout(&[(10, 0), (50, 0), (100, 0)]), fleet(50, &["pi5"]));
    sim.step(0);
    let plan = sim.command(Verb::Pause, "", 1).expect("pause");
    sim.apply(plan);
    assert_eq!(sim.state(), RolloutState::Paused);
    let b = sim.in_b().len();
    sim.step(2);
    sim.step(3);
    assert_eq!((sim.state(), sim.in_b().len()), (RolloutState::Paused, b), "paused moves nothing");
    assert!(matches!(sim.command(Verb::Pause, "", 4), Err(VerbError::WrongState { .. })));
    let plan = sim.command(Verb::Promote, "urgent fix", 5).expect("promote");
    sim.apply(plan);
    sim.step(6);
    assert_eq!(sim.in_b().len(), 50, "promote goes to 100%");
    sim.step(7);
    assert_eq!(sim.state(), RolloutState::Completed);
    let err = sim.command(Verb::Abort, "", 8).expect_err("completed");
    assert!(err.to_string().contains("completed"), "{err}");
    let kinds: Vec<&str> = sim.events.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"pause") && kinds.contains(&"promote") && kinds.contains(&"completed"), "{kinds:?}");
}

#[test]
fn retry_gives_failed_devices_a_new_generation() {
    let mut sim = Sim::new(rollout(&[(100, 0)]), fleet(5, &["pi5"]));
    sim.failing.insert("d0002".into());
    sim.step(0);
    sim.step(1);
    assert_eq!(sim.rollout.counts.map(|c| c.failed), Some(1));
    let generation = sim.devices[2].desired_generation;
    sim.failing.clear();
    let plan = sim.command(Verb::Retry, "", 2).expect("retry");
    assert_eq!(plan.retry, vec![device_id("d0002")]);
    sim.apply(plan);
    assert_eq!(sim.devices[2].desired_generation, generation + 1);
    sim.step(3);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert!(matches!(sim.command(Verb::Retry, "", 4), Err(VerbError::WrongState { .. })));
}

#[test]
fn devices_that_served_nothing_go_back_to_serving_nothing_on_abort() {
    let mut devices = fleet(4, &["pi5"]);
    for d in &mut devices[..2] {
        d.running = None;
        d.desired = None;
        d.desired_runtime = None;
    }
    let mut sim = Sim::new(rollout(&[(100, 0)]), devices);
    sim.offline.insert("d0000".into());
    sim.step(0);
    assert!(sim.devices[1].running.is_some(), "d0001 runs B");
    let plan = sim.command(Verb::Abort, "bad", 1).expect("abort");
    assert_eq!(plan.to_baseline.len(), 4, "every B device returns, with or without a bundle before");
    let nothing: Vec<&str> =
        plan.to_baseline.iter().filter(|r| r.bundle.is_none()).map(|r| r.device_id.as_str()).collect();
    assert_eq!(nothing, ["d0000", "d0001"]);
    sim.apply(plan);
    assert!(
        sim.rollout.message.contains("4 devices return to A (2 of them to serving nothing"),
        "{}",
        sim.rollout.message
    );
    assert!(sim.devices[1].running.is_none() && sim.devices[1].desired_serve_nothing, "d0001 serves nothing");
    assert_eq!(sim.devices[2].running.as_ref().map(|b| b.digest.as_str()), Some("sha256:aa"));
    // The offline one still has B desired in this simulation until it is enforced again: a later pass on
    // the facts repeats nothing for devices already moved, and everything for a device still in B.
    sim.devices[0].cohort = COHORT_CANDIDATE.into();
    let other = HashSet::new();
    let facts = Facts {
        devices: &keyed(&sim.devices),
        records: &keyed(&sim.records),
        other_active: &other,
        measurements: &sim.measurements,
        evaluations: &Evaluations::default(),
    };
    let again = decide(&keyed_rollout(&sim.rollout), &facts, UnixMs(2));
    assert_eq!(
        again.to_baseline.iter().map(|r| (r.device_id.as_str(), r.bundle.is_none())).collect::<Vec<_>>(),
        [("d0000", true)]
    );
}

#[test]
fn devices_in_another_active_rollout_are_left_alone() {
    let mut devices = fleet(10, &["pi5"]);
    devices[0].rollout_id = "ro-other".into();
    devices[0].cohort = COHORT_CANDIDATE.into();
    let other = HashSet::from([rollout_id("ro-other")]);
    let r = keyed_rollout(&rollout(&[(100, 0)]));
    let none = Evaluations::default();
    let devices = keyed(&devices);
    let facts = Facts {
        devices: &devices,
        records: &[],
        other_active: &other,
        measurements: &Measurements::default(),
        evaluations: &none,
    };
    let plan = decide(&r, &facts, UnixMs(0));
    assert_eq!(plan.to_candidate.len(), 9);
    assert!(!plan.to_candidate.contains(&device_id("d0000")));
    // A finished rollout's devices are free again.
    let facts = Facts {
        devices: &devices,
        records: &[],
        other_active: &HashSet::new(),
        measurements: &Measurements::default(),
        evaluations: &none,
    };
    assert_eq!(decide(&r, &facts, UnixMs(0)).to_candidate.len(), 10);
}

proptest! {
    #[test]
    fn cohort_sizes_are_close_to_the_percentage(percent in 1u32..=100, n in 200usize..1500, seed in "[a-z0-9]{6}") {
        let rollout_id = rollout_id(&format!("ro-{seed}"));
        let in_b = (0..n).filter(|i| in_candidate(&rollout_id, &device_id(&format!("dev-{i}")), percent)).count();
        let expected = n as f64 * f64::from(percent) / 100.0;
        // Binomial: 5 standard deviations plus one device.
        let sd = (n as f64 * f64::from(percent) / 100.0 * (1.0 - f64::from(percent) / 100.0)).sqrt();
        prop_assert!((in_b as f64 - expected).abs() <= 5.0 * sd + 1.0, "{in_b} vs {expected}");
    }

    #[test]
    fn membership_is_monotonic_in_percent(device in "[a-z0-9-]{1,20}", p in 0u32..=100, q in 0u32..=100) {
        let (lo, hi) = (p.min(q), p.max(q));
        let (rollout, device) = (rollout_id("ro-x"), device_id(&device));
        prop_assert!(!in_candidate(&rollout, &device, lo) || in_candidate(&rollout, &device, hi));
        prop_assert!(in_candidate(&rollout, &device, 100));
    }

    #[test]
    fn no_device_is_in_both_cohorts_and_abort_returns_every_b_device_to_a(
        n in 5usize..80,
        steps in proptest::collection::vec(1u32..100, 0..4),
        fail_every in 0usize..6,
        abort_after in 0usize..6,
        offline_every in 0usize..7,
    ) {
        let mut percents: Vec<u32> = steps;
        percents.sort_unstable();
        percents.push(100);
        let steps: Vec<(u32, u32)> = percents.iter().map(|&p| (p, 0)).collect();
        let mut sim = Sim::new(rollout(&steps), fleet(n, &["pi5", "orin"]));
        for (i, d) in sim.devices.iter().enumerate() {
            if fail_every > 0 && i % fail_every == 0 { sim.failing.insert(d.id.clone()); }
            if offline_every > 0 && i % offline_every == 1 { sim.offline.insert(d.id.clone()); }
        }
        let mut previous_b: HashSet<String> = HashSet::new();
        for t in 0..abort_after {
            sim.step(t as i64);
            let b: HashSet<String> = sim.in_b().iter().map(|d| d.id.clone()).collect();
            prop_assert!(previous_b.is_subset(&b), "B only grows before an abort");
            for d in &sim.devices {
                let cohorts = [d.cohort == COHORT_CANDIDATE, d.cohort == COHORT_BASELINE];
                prop_assert!(!(cohorts[0] && cohorts[1]));
            }
            previous_b = b;
        }
        if !is_active(sim.state()) {
            return Ok(());
        }
        let originally: HashMap<String, Option<proto::BundleRef>> =
            fleet(n, &["pi5"]).into_iter().map(|d| (d.id.clone(), d.running)).collect();
        let plan = sim.command(Verb::Abort, "", 100).expect("abort an active rollout");
        sim.offline.clear();
        sim.apply(plan);
        sim.step(101);
        prop_assert_eq!(sim.state(), RolloutState::Aborted);
        prop_assert!(sim.in_b().is_empty());
        for d in &sim.devices {
            if previous_b.contains(&d.id) {
                prop_assert_eq!(&d.desired, &originally[&d.id], "desired A for {}", d.id);
                prop_assert_eq!(d.cohort.as_str(), COHORT_BASELINE);
            }
        }
    }
}

/// A fleet whose devices measured A (each a little different), with performance gates on B.
fn perf_sim(policy: ClassFailurePolicy, b_speed: &[(&str, f64)]) -> Sim {
    let mut r = gated(&[(20, 0), (50, 0), (100, 0)], policy);
    if let Some(gates) = r.spec.as_mut().and_then(|s| s.gates.as_mut()) {
        gates.min_tokens_per_second_ratio = Some(0.9);
        gates.max_ttft_ratio = Some(1.25);
    }
    let mut sim = Sim::new(r, fleet(150, &["pi5", "orin", "x86"]));
    for (i, d) in sim.devices.iter().enumerate() {
        let m = crate::insight::compare::Measure {
            tokens_per_second: Some(10.0 + (i % 7) as f64),
            ttft_ms: Some(300.0 + (i % 5) as f64),
            traffic: None,
        };
        sim.measurements.insert(&d.id, "sha256:aa", m);
    }
    sim.b_speed = b_speed.iter().map(|(c, f)| ((*c).to_owned(), *f)).collect();
    sim
}

#[test]
fn a_class_thirty_percent_slower_fails_the_tokens_gate_and_is_halted() {
    let mut sim = perf_sim(ClassFailurePolicy::HaltClass, &[("pi5", 0.7), ("orin", 1.0), ("x86", 1.1)]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["pi5".to_owned()]);
    let halt = sim.events.iter().find(|e| e.kind == "class_halted").expect("halt event");
    assert!(halt.message.contains("tokens/s ratio 0.70 < min 0.90"), "{}", halt.message);
    let x86 = sim.rollout.classes.iter().find(|c| c.class == "x86").expect("x86");
    assert!((x86.tokens_per_second_ratio - 1.1).abs() < 1e-9, "paired ratio: {}", x86.tokens_per_second_ratio);
    assert!(x86.ttft_ratio > 0.0 && x86.ttft_ratio < 1.0);
    assert_eq!(x86.b_samples, 50);
    for d in &sim.devices {
        let on_b = d.running.as_ref().is_some_and(|b| b.digest == "sha256:bb");
        assert_eq!(on_b, d.labels["class"] != "pi5", "{}", d.id);
    }
}

#[test]
fn a_slower_class_aborts_the_rollout_under_the_abort_policy() {
    let mut sim = perf_sim(ClassFailurePolicy::Abort, &[("pi5", 0.7), ("orin", 1.0), ("x86", 1.0)]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Aborted);
    assert!(sim.rollout.message.contains("pi5: tokens/s ratio 0.70"), "{}", sim.rollout.message);
    assert!(sim.in_b().is_empty());
}

#[test]
fn performance_gates_wait_for_measurements_and_hold_when_a_is_unmeasured() {
    // B devices activate but report nothing: the class waits for their measurements.
    let mut sim = perf_sim(ClassFailurePolicy::Abort, &[]);
    sim.run(0, 10_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Progressing);
    assert_eq!(sim.rollout.current_step, 0);
    assert!(sim.rollout.message.contains("waiting for measurements"), "{}", sim.rollout.message);

    // Every B device measured, but A never was: inconclusive, held for a human under HOLD.
    let mut sim = perf_sim(ClassFailurePolicy::Abort, &[("pi5", 1.0), ("orin", 1.0), ("x86", 1.0)]);
    if let Some(spec) = sim.rollout.spec.as_mut() {
        spec.on_inconclusive = InconclusivePolicy::Hold as i32;
    }
    // Step 1 moves devices to B, which measure it; then A's measurements are lost.
    sim.run(0, 0, 1_000);
    let mut fresh = Measurements::default();
    for d in sim.in_b() {
        if let Some(b) = sim.measurements.get(&d.id, "sha256:bb") {
            fresh.insert(&d.id, "sha256:bb", b);
        }
    }
    sim.measurements = fresh;
    sim.run(1_000, 5_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("inconclusive"), "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("not measured on enough devices"), "{}", sim.rollout.message);
}

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// Monday 2026-11-23 00:00 UTC.
const MONDAY: i64 = 20_780 * DAY;

fn windowed(steps: &[(u32, u32)], start: u32, end: u32, weekdays: &[u32]) -> proto::Rollout {
    let mut r = rollout(steps);
    if let Some(spec) = r.spec.as_mut() {
        spec.schedule =
            Some(proto::ScheduleWindow { start_minute_utc: start, end_minute_utc: end, weekdays: weekdays.into() });
    }
    r
}

fn window_of_test(r: &proto::Rollout) -> Window {
    Window::new(r.spec.as_ref().and_then(|s| s.schedule.as_ref()).expect("window")).expect("valid")
}

#[test]
fn a_closed_window_holds_the_start_and_says_when_it_opens() {
    let mut sim = Sim::new(windowed(&[(100, 0)], 60, 300, &[]), fleet(10, &["pi5"]));
    let plan = sim.step(MONDAY + 10 * MINUTE);
    assert_eq!(sim.state(), RolloutState::Pending);
    assert!(plan.to_candidate.is_empty() && plan.events.is_empty());
    assert_eq!(sim.rollout.window_opens_unix_ms, MONDAY + HOUR);
    assert!(
        sim.rollout.message.contains("outside the schedule window 01:00-05:00 UTC; opens 2026-11-23T01:00:00Z"),
        "{}",
        sim.rollout.message
    );
    // Deciding again changes nothing until the window opens.
    assert!(!sim.step(MONDAY + 20 * MINUTE).changes(&sim.rollout));
    sim.step(MONDAY + HOUR);
    assert_eq!(sim.rollout.window_opens_unix_ms, 0);
    assert_eq!(sim.in_b().len(), 10);
    sim.step(MONDAY + HOUR + MINUTE);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
}

#[test]
fn steps_advance_only_inside_the_window_and_wait_overnight() {
    // One hour a night; each step soaks 40 minutes: step 2 starts at 01:40 and advances the next night.
    let r = windowed(&[(10, 2400), (50, 2400), (100, 0)], 60, 120, &[]);
    let w = window_of_test(&r);
    let mut sim = Sim::new(r, fleet(100, &["pi5", "orin"]));
    let mut now = MONDAY;
    let mut advanced_at = Vec::new();
    while is_active(sim.state()) && now < MONDAY + 7 * DAY {
        let plan = sim.step(now);
        if !plan.to_candidate.is_empty() {
            assert!(w.is_open(now), "devices moved to B at {now} outside the window");
        }
        for e in plan.events.iter().filter(|e| e.kind == "advanced" || e.kind == "started") {
            assert!(w.is_open(e.unix_ms), "{} at {} outside the window", e.kind, e.unix_ms);
            advanced_at.push(e.unix_ms);
        }
        if !w.is_open(now) && is_active(sim.state()) {
            assert_eq!(sim.rollout.window_opens_unix_ms, w.next_opening(now));
        }
        now += 10 * MINUTE;
    }
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(advanced_at, [MONDAY + HOUR, MONDAY + HOUR + 40 * MINUTE, MONDAY + DAY + HOUR]);
}

#[test]
fn refills_and_joiners_wait_for_the_window_while_safety_acts_at_once() {
    let mut r = windowed(&[(100, 0)], 60, 120, &[]);
    if let Some(spec) = r.spec.as_mut() {
        spec.max_concurrent = 4;
        spec.gates = Some(proto::RolloutGates { max_failures: Some(0), ..Default::default() });
    }
    let mut sim = Sim::new(r, fleet(12, &["pi5"]));
    // Inside the window: the first four; the devices converge at once and the next pass refills.
    sim.offline.extend(["d0000", "d0001", "d0002", "d0003", "d0004", "d0005"].map(String::from));
    sim.step(MONDAY + HOUR);
    assert_eq!(sim.in_b().len(), 4);
    // The window closes with four devices converging (offline): refills wait, and so does a joiner.
    let closed = MONDAY + 3 * HOUR;
    sim.devices.push(device("late", "lab", "pi5"));
    let plan = sim.step(closed);
    assert!(plan.to_candidate.is_empty(), "{:?}", plan.to_candidate);
    assert!(sim.rollout.message.contains("outside the schedule window"), "{}", sim.rollout.message);
    assert_eq!(sim.rollout.counts.map(|c| c.selected), Some(13));
    // An operator's abort outside the window returns every B device at once.
    let plan = sim.command(Verb::Abort, "night is over", closed + MINUTE).expect("abort");
    assert_eq!(plan.to_baseline.len(), 4);
    assert_eq!(plan.rollout.state, RolloutState::Aborted as i32);
    assert!(sim.rollout.window_opens_unix_ms > 0);
    assert_eq!(plan.rollout.window_opens_unix_ms, 0, "an aborted rollout waits for no window");
}

#[test]
fn failing_gates_abort_outside_the_window_and_promote_ignores_it() {
    // Deadline failures found after the window closed abort at once.
    let mut r = windowed(&[(50, 0), (100, 0)], 60, 120, &[]);
    if let Some(spec) = r.spec.as_mut() {
        spec.device_deadline_seconds = 3600;
        spec.gates = Some(proto::RolloutGates { max_failures: Some(0), ..Default::default() });
    }
    let mut sim = Sim::new(r.clone(), fleet(20, &["pi5"]));
    sim.offline.extend(sim.devices.iter().map(|d| d.id.clone()));
    sim.step(MONDAY + HOUR);
    assert!(!sim.in_b().is_empty());
    let plan = sim.step(MONDAY + 3 * HOUR);
    assert_eq!(sim.state(), RolloutState::Aborted, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.window_opens_unix_ms, 0);
    assert_eq!(plan.to_baseline.len(), sim.records.len());

    // Promote outside the window: every selected device goes to B on the next pass.
    let mut sim = Sim::new(r, fleet(20, &["pi5"]));
    sim.step(MONDAY + HOUR);
    let first = sim.in_b().len();
    assert!(first < 20);
    let closed = MONDAY + 12 * HOUR;
    sim.step(closed);
    assert_eq!(sim.in_b().len(), first, "nothing moves while closed");
    let plan = sim.command(Verb::Promote, "", closed).expect("promote");
    sim.apply(plan);
    sim.step(closed + MINUTE);
    assert_eq!(sim.in_b().len(), 20);
    assert_eq!(sim.rollout.window_opens_unix_ms, 0);
    sim.step(closed + 2 * MINUTE);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Whatever the window, soak, concurrency and failures: devices move to B and steps advance only while
    /// the window is open, devices return to A whenever gates fail, and a rollout ends within a month
    /// (three steps, each waiting at most a week for its window).
    #[test]
    fn nothing_moves_to_b_outside_the_window(
        start in 0u32..1440, length in 60u32..600, days in proptest::collection::btree_set(0u32..7, 0..4),
        soak in 0u32..3600, max_concurrent in prop_oneof![Just(0u32), 10u32..20], failing in 0usize..6,
        n in 5usize..40,
    ) {
        let end = (start + length) % 1440;
        let mut r = windowed(&[(10, soak), (50, soak), (100, soak)], start, end, &days.into_iter().collect::<Vec<_>>());
        if let Some(spec) = r.spec.as_mut() {
            spec.max_concurrent = max_concurrent;
            spec.gates = Some(proto::RolloutGates { max_failures: Some(2), ..Default::default() });
            spec.on_inconclusive = InconclusivePolicy::Advance as i32;
        }
        let w = window_of_test(&r);
        let mut sim = Sim::new(r, fleet(n, &["pi5", "orin"]));
        sim.failing.extend((0..failing).map(|i| format!("d{:04}", i * 7 % n)));
        let mut now = MONDAY;
        while is_active(sim.state()) && now < MONDAY + 30 * DAY {
            let plan = sim.step(now);
            let open = w.is_open(now);
            prop_assert!(open || plan.to_candidate.is_empty(), "moved to B at {} while closed", now);
            prop_assert!(open || !plan.events.iter().any(|e| e.kind == "advanced" || e.kind == "started"));
            if plan.rollout.state == RolloutState::Aborted as i32 {
                prop_assert!(sim.devices.iter().all(|d| d.cohort != COHORT_CANDIDATE), "abort returns all");
            }
            now += 10 * MINUTE;
        }
        prop_assert!(!is_active(sim.state()), "{}", sim.rollout.message);
    }
}

fn prestaged(steps: &[(u32, u32)]) -> proto::Rollout {
    let mut r = rollout(steps);
    if let Some(spec) = r.spec.as_mut() {
        spec.prestage = true;
    }
    r
}

#[test]
fn prestage_tells_every_selected_connected_device_once() {
    let mut devices = fleet(10, &["pi5", "orin"]);
    devices.push(device("elsewhere", "other-site", "pi5"));
    devices[3].connected = false;
    // Already staged (reported in its Hello): not told again.
    devices[4].staged = vec![bundle("sha256:bb")];
    let mut sim = Sim::new(prestaged(&[(10, 3600), (100, 0)]), devices);
    let plan = sim.step(0);
    let mut told: Vec<&str> = plan.prestage.iter().map(|o| o.device_id.as_str()).collect();
    told.sort();
    assert_eq!(told, ["d0000", "d0001", "d0002", "d0005", "d0006", "d0007", "d0008", "d0009"]);
    assert!(plan.prestage.iter().all(|o| o.attempt == 1));
    // Answered ready: nothing more to send; the class counts say so.
    let plan = sim.step(1_000);
    assert!(plan.prestage.is_empty(), "{:?}", plan.prestage);
    let staged: u32 = sim.rollout.classes.iter().map(|c| c.staged).sum();
    assert_eq!(staged, 9, "{:?}", sim.rollout.classes);
    // The offline device is told when it connects.
    sim.devices[3].connected = true;
    let plan = sim.step(2_000);
    assert_eq!(plan.prestage.iter().map(|o| o.device_id.as_str()).collect::<Vec<_>>(), ["d0003"]);
    // A device joining the selector mid-rollout is told too.
    sim.devices[10].labels.insert("site".into(), "lab".into());
    let plan = sim.step(3_000);
    assert_eq!(plan.prestage.iter().map(|o| o.device_id.as_str()).collect::<Vec<_>>(), ["elsewhere"]);
    assert!(sim.step(4_000).prestage.is_empty());
    assert_eq!(sim.rollout.classes.iter().map(|c| c.staged).sum::<u32>(), 11);
}

#[test]
fn a_failed_staging_is_retried_with_backoff_and_bounded() {
    let mut sim = Sim::new(prestaged(&[(1, 36_000), (100, 0)]), fleet(3, &["pi5"]));
    sim.stage_failing.insert("d0001".into());
    let mut now = 0;
    while now < 2 * 3600 * 1000 {
        sim.step(now);
        now += 1_000;
    }
    let attempts: Vec<(u32, i64)> =
        sim.prestaged.iter().filter(|(id, _, _)| id == "d0001").map(|(_, a, t)| (*a, *t)).collect();
    assert_eq!(attempts.len() as u32, PRESTAGE_MAX_ATTEMPTS, "{attempts:?}");
    for pair in attempts.windows(2) {
        let backoff = (PRESTAGE_BACKOFF.as_millis() as i64) << (pair[0].0 - 1);
        assert!(pair[1].1 - pair[0].1 >= backoff, "{attempts:?}");
        assert_eq!(pair[1].0, pair[0].0 + 1);
    }
    assert_eq!(sim.prestaged.iter().filter(|(id, _, _)| id != "d0001").count(), 2, "the others once each");
    let class = &sim.rollout.classes[0];
    assert_eq!((class.staged, class.stage_failed), (2, 1), "{class:?}");
    let retries: Vec<&str> =
        sim.events.iter().filter(|e| e.kind == "prestage_retry").map(|e| e.device_id.as_str()).collect();
    assert_eq!(retries.len() as u32, PRESTAGE_MAX_ATTEMPTS - 1);
    assert!(retries.iter().all(|d| *d == "d0001"));
}

#[test]
fn prestage_runs_while_the_window_is_closed_and_not_without_the_flag() {
    let mut r = windowed(&[(100, 0)], 60, 120, &[]);
    if let Some(spec) = r.spec.as_mut() {
        spec.prestage = true;
    }
    let mut sim = Sim::new(r, fleet(5, &["pi5"]));
    let plan = sim.step(MONDAY + 12 * HOUR);
    assert_eq!(sim.state(), RolloutState::Pending);
    assert_eq!(plan.prestage.len(), 5, "staging downloads; it does not wait for the window");
    assert!(plan.to_candidate.is_empty());
    assert_eq!(sim.rollout.classes.first().map(|c| c.staged), Some(0), "counted on the next pass");
    sim.step(MONDAY + 12 * HOUR + 1);
    assert_eq!(sim.rollout.classes.first().map(|c| c.staged), Some(5));

    let mut sim = Sim::new(rollout(&[(100, 0)]), fleet(5, &["pi5"]));
    assert!(sim.step(0).prestage.is_empty());
}
