//! The quality and error-rate gates under the engine: pass, fail with the values named, wait for devices
//! that have not reported, hold when inconclusive, halt only the failing class; and a property test holding
//! the engine to the quality rules of its module documentation.

use alki_shared::eval::quality::CouldNotRun;

use super::*;
use crate::insight::quality::tests::measured;

fn good() -> Outcome {
    measured(0.001, 0.99, (20, 20))
}

fn far() -> Outcome {
    measured(2.5, 0.31, (20, 20))
}

fn broken_template() -> Outcome {
    measured(0.0, 1.0, (20, 3))
}

fn does_not_fit() -> Outcome {
    Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes: 2 << 30, available_bytes: 1 << 30 })
}

/// A rollout with an eval suite and quality gates (KLD ≤ 0.05, top-1 ≥ 0.9, golden pass ≥ 0.8, 3 samples).
fn quality_rollout(policy: ClassFailurePolicy) -> proto::Rollout {
    let mut r = gated(&[(20, 0), (100, 0)], policy);
    r.eval_suite = Some(bundle("sha256:5e"));
    if let Some(spec) = r.spec.as_mut() {
        spec.eval_suite = "acme/suite:v1".into();
        spec.on_inconclusive = InconclusivePolicy::Hold as i32;
        if let Some(g) = spec.gates.as_mut() {
            g.max_kld = Some(0.05);
            g.min_top1_agreement = Some(0.9);
            g.min_golden_pass = Some(0.8);
        }
    }
    r
}

fn quality_sim(policy: ClassFailurePolicy, outcomes: &[(&str, Outcome)]) -> Sim {
    let mut sim = Sim::new(quality_rollout(policy), fleet(150, &["pi5", "orin", "x86"]));
    sim.quality = outcomes.iter().map(|(c, o)| ((*c).to_owned(), o.clone())).collect();
    sim
}

fn class<'a>(sim: &'a Sim, name: &str) -> &'a proto::ClassStatus {
    sim.rollout.classes.iter().find(|c| c.class == name).expect("class listed")
}

#[test]
fn a_close_candidate_passes_every_quality_gate_and_completes_showing_the_worst_values() {
    let mut sim = quality_sim(ClassFailurePolicy::Abort, &[("pi5", good()), ("orin", good()), ("x86", good())]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    let pi5 = class(&sim, "pi5");
    let q = pi5.quality.expect("quality shown");
    assert_eq!((q.measured, q.could_not_run, q.max_kld, q.min_golden_pass), (50, 0, Some(0.001), Some(1.0)));
    assert!(sim.in_b().len() == 150);
}

#[test]
fn a_far_candidate_halts_its_class_with_the_gate_the_value_the_device_and_the_limit() {
    let mut sim = quality_sim(ClassFailurePolicy::HaltClass, &[("pi5", good()), ("orin", far()), ("x86", good())]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["orin".to_owned()]);
    let halt = sim.events.iter().find(|e| e.kind == "class_halted").expect("halt event");
    assert!(halt.message.contains("quality: KL divergence 2.5000 > --max-kld 0.05 on device d"), "{}", halt.message);
    for d in &sim.devices {
        let on_b = d.running.as_ref().is_some_and(|b| b.digest == "sha256:bb");
        assert_eq!(on_b, d.labels["class"] != "orin", "{}", d.id);
    }
}

#[test]
fn a_broken_chat_template_fails_the_golden_gate_and_aborts_under_the_abort_policy() {
    let mut sim =
        quality_sim(ClassFailurePolicy::Abort, &[("pi5", good()), ("orin", broken_template()), ("x86", good())]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Aborted);
    assert!(
        sim.rollout.message.contains("orin: quality: golden pass rate 0.1500 < --min-golden-pass 0.8 on device"),
        "{}",
        sim.rollout.message
    );
    assert!(sim.in_b().is_empty());
}

#[test]
fn a_breach_fails_the_class_at_once_while_other_devices_still_converge() {
    let mut sim = quality_sim(ClassFailurePolicy::HaltClass, &[("pi5", far())]);
    // One pi5 device of the first step converges, the others never do: its far result is enough.
    let pi5: Vec<String> = sim
        .devices
        .iter()
        .filter(|d| {
            d.labels["class"] == "pi5"
                && in_candidate(&RolloutId::new("ro-1").expect("id"), &super::device_id(&d.id), 20)
        })
        .map(|d| d.id.clone())
        .collect();
    assert!(pi5.len() > 1);
    sim.offline = pi5[1..].iter().cloned().collect();
    sim.step(0);
    sim.step(1_000);
    assert!(sim.rollout.halted_classes.contains(&"pi5".to_owned()), "{:?}", sim.rollout.classes);
}

#[test]
fn a_class_waits_for_devices_that_have_not_reported_until_their_deadline_then_holds() {
    let mut sim = quality_sim(ClassFailurePolicy::Abort, &[("pi5", good()), ("orin", good()), ("x86", good())]);
    let x86: Vec<String> = sim.devices.iter().filter(|d| d.labels["class"] == "x86").map(|d| d.id.clone()).collect();
    // Every x86 device that reaches B at the first step stays silent: three of them suffice for min_devices.
    sim.silent = x86.iter().cloned().collect();
    sim.run(0, 20_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Progressing, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.current_step, 0);
    let x = class(&sim, "x86");
    assert_eq!(x.verdict, GateVerdict::Waiting as i32);
    assert!(x.reason.contains("waiting for quality evaluations from"), "{}", x.reason);

    // With a deadline, silent devices are given up on: too few results, held for a human.
    if let Some(spec) = sim.rollout.spec.as_mut() {
        spec.device_deadline_seconds = 60;
    }
    sim.run(21_000, 200_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.pause_reason, PauseReason::Inconclusive as i32);
    assert!(sim.rollout.message.contains("x86: too few quality results (3 needed)"), "{}", sim.rollout.message);
}

#[test]
fn devices_that_could_not_run_make_the_class_inconclusive_naming_why() {
    let mut sim = quality_sim(ClassFailurePolicy::Abort, &[("pi5", good()), ("orin", does_not_fit()), ("x86", good())]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("held for a human, inconclusive"), "{}", sim.rollout.message);
    let orin = class(&sim, "orin");
    let (q, candidates) = (orin.quality.expect("quality shown"), orin.counts.map(|c| c.candidate).unwrap_or(0));
    assert_eq!((q.measured, q.could_not_run), (0, candidates));
    let why = format!("orin: too few quality results (3 needed): KL divergence measured on 0 of {candidates} devices");
    assert!(sim.rollout.message.contains(&why), "{}", sim.rollout.message);
    let why = format!("could not run: does not fit: {candidates}");
    assert!(sim.rollout.message.contains(&why), "{}", sim.rollout.message);
    // An operator accepts the step; the rollout goes on.
    let plan = sim.command(Verb::Resume, "checked by hand", 200_000).expect("resume");
    sim.apply(plan);
    sim.step(201_000);
    assert_eq!(sim.rollout.current_step, 1, "{}", sim.rollout.message);
}

#[test]
fn a_suite_without_quality_gates_shows_evaluations_and_gates_nothing() {
    let mut r = quality_rollout(ClassFailurePolicy::Abort);
    if let Some(g) = r.spec.as_mut().and_then(|s| s.gates.as_mut()) {
        (g.max_kld, g.min_top1_agreement, g.min_golden_pass) = (None, None, None);
    }
    let mut sim = Sim::new(r, fleet(30, &["pi5"]));
    sim.quality = HashMap::from([("pi5".to_owned(), far())]);
    sim.silent = sim.devices.iter().take(3).map(|d| d.id.clone()).collect();
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(class(&sim, "pi5").quality.and_then(|q| q.max_kld), Some(2.5));
}

/// Error-rate gate: A devices served 10,000 requests with 10 errors each.
fn error_sim(b: &[(&str, Traffic)]) -> Sim {
    let mut r = gated(&[(20, 0), (100, 0)], ClassFailurePolicy::HaltClass);
    if let Some(g) = r.spec.as_mut().and_then(|s| s.gates.as_mut()) {
        g.max_error_rate_ratio = Some(2.0);
    }
    let mut sim = Sim::new(r, fleet(60, &["pi5", "orin"]));
    for d in &sim.devices {
        let traffic = Traffic { requests: 10_000, errors: 10 };
        sim.measurements.insert(&d.id, "sha256:aa", Measure { traffic: Some(traffic), ..Default::default() });
    }
    sim.b_traffic = b.iter().map(|(c, t)| ((*c).to_owned(), *t)).collect();
    sim
}

#[test]
fn a_class_serving_errors_far_more_often_than_a_is_halted_with_both_rates() {
    let bad = Traffic { requests: 1_000, errors: 100 };
    let fine = Traffic { requests: 1_000, errors: 1 };
    let mut sim = error_sim(&[("pi5", bad), ("orin", fine)]);
    sim.run(0, 100_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Completed, "{}", sim.rollout.message);
    assert_eq!(sim.rollout.halted_classes, vec!["pi5".to_owned()]);
    let halt = sim.events.iter().find(|e| e.kind == "class_halted").expect("halt event");
    assert!(halt.message.contains("error rate 0.1000 > max 0.0020 (--max-error-rate-ratio 2"), "{}", halt.message);
    let orin = class(&sim, "orin");
    assert!((orin.b_error_rate - 0.001).abs() < 1e-12 && (orin.a_error_rate - 0.001).abs() < 1e-12, "{orin:?}");
}

#[test]
fn the_error_rate_gate_waits_for_requests_on_b_until_the_deadline_then_holds_without_traffic() {
    let mut sim = error_sim(&[]);
    if let Some(spec) = sim.rollout.spec.as_mut() {
        spec.on_inconclusive = InconclusivePolicy::Hold as i32;
        spec.device_deadline_seconds = 60;
    }
    sim.run(0, 10_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Progressing);
    assert!(sim.rollout.message.contains("waiting for requests served on B from"), "{}", sim.rollout.message);
    // Telemetry arrives, but B served nothing yet: a report without requests is no sample, still waiting.
    for d in sim.in_b().iter().map(|d| d.id.clone()).collect::<Vec<_>>() {
        sim.measurements.insert(&d, "sha256:bb", Measure { traffic: Some(Traffic::default()), ..Default::default() });
    }
    sim.run(11_000, 20_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Progressing, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("waiting for requests served on B"), "{}", sim.rollout.message);
    // Still nothing served past the devices' deadline: too few samples, held (inconclusive policy HOLD).
    sim.run(21_000, 120_000, 1_000);
    assert_eq!(sim.state(), RolloutState::Paused, "{}", sim.rollout.message);
    assert!(sim.rollout.message.contains("error rate not measured"), "{}", sim.rollout.message);
}

/// What one device does with the candidate, for the property test.
#[derive(Clone, Debug)]
enum Reported {
    Good,
    Far,
    Garbage,
    BrokenTemplate,
    CouldNotRun,
    Silent,
}

impl Reported {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Reported::Good => Some(good()),
            Reported::Far => Some(far()),
            Reported::Garbage => Some(measured(f64::NAN, 0.99, (20, 20))),
            Reported::BrokenTemplate => Some(broken_template()),
            Reported::CouldNotRun => Some(does_not_fit()),
            Reported::Silent => None,
        }
    }

    fn breaches(&self) -> bool {
        matches!(self, Reported::Far | Reported::Garbage | Reported::BrokenTemplate)
    }
}

fn reported() -> impl Strategy<Value = Reported> {
    prop_oneof![
        12 => Just(Reported::Good),
        1 => Just(Reported::Far),
        1 => Just(Reported::Garbage),
        1 => Just(Reported::BrokenTemplate),
        2 => Just(Reported::CouldNotRun),
        1 => Just(Reported::Silent),
    ]
}

/// Runs a rollout whose devices each report `behaviour[i]` (device i is of class `i % 3`) until it
/// finishes, holds, or 400 s pass; a held rollout is judged once more, so every report has been seen.
fn run_quality(behaviour: &[Reported], deadline_seconds: u32, min_devices: u32) -> (Sim, HashMap<String, Reported>) {
    let mut r = quality_rollout(ClassFailurePolicy::HaltClass);
    if let Some(spec) = r.spec.as_mut() {
        spec.device_deadline_seconds = deadline_seconds;
        if let Some(g) = spec.gates.as_mut() {
            g.min_devices = min_devices;
        }
    }
    let devices = fleet(behaviour.len(), &["pi5", "orin", "x86"]);
    let by_device: HashMap<String, Reported> =
        devices.iter().map(|d| d.id.clone()).zip(behaviour.iter().cloned()).collect();
    let mut sim = Sim::new(r, devices);
    // Every class reports; each device's own outcome replaces its class's below.
    sim.quality = ["pi5", "orin", "x86"].iter().map(|c| ((*c).to_owned(), good())).collect();
    sim.silent = by_device.iter().filter(|(_, b)| matches!(b, Reported::Silent)).map(|(d, _)| d.clone()).collect();
    let mut now = 0;
    loop {
        let before = sim.evaluations.len();
        sim.step(now);
        for e in sim.evaluations.iter_mut().skip(before) {
            if let Some(o) = by_device[&e.device_id].outcome() {
                e.outcome = o;
            }
        }
        now += 1_000;
        if !is_active(sim.state()) || now > 400_000 {
            break;
        }
        if sim.state() == RolloutState::Paused {
            sim.step(now);
            break;
        }
    }
    (sim, by_device)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The quality rules of the engine's specification, on generated fleets: a class where a device in B
    /// reported a breach fails (and is halted, unless the rollout is held) with the breach named, and only
    /// such classes; a class never passes while a device of it in B has not reported (before its deadline);
    /// a completed rollout had enough samples per gate in every class it did not halt; a hold names a class
    /// with too few, and a rollout still going waits for a device that has not reported.
    #[test]
    fn quality_gates_hold_to_the_specification(
        behaviour in proptest::collection::vec(reported(), 3..30),
        deadline in prop_oneof![Just(0u32), Just(120u32)],
        min_devices in 1u32..4,
    ) {
        let (sim, by_device) = run_quality(&behaviour, deadline, min_devices);
        let classes: BTreeSet<String> = sim.devices.iter().map(|d| d.labels["class"].clone()).collect();
        let reported = |d: &str| sim.evaluations.iter().any(|e| e.device_id == d);
        for class in &classes {
            let breached = sim.records.iter()
                .filter(|r| &r.class == class && reported(&r.device_id))
                .any(|r| by_device[&r.device_id].breaches());
            let status = sim.rollout.classes.iter().find(|c| &c.class == class);
            let halted = sim.rollout.halted_classes.contains(class);
            let failing = status.is_some_and(|s| s.verdict == GateVerdict::Fail as i32);
            prop_assert_eq!(breached, halted || failing, "class {}: {}", class, sim.rollout.message);
            if halted {
                let halt = format!("class {class} halted (quality: ");
                let event = sim.events.iter().find(|e| e.kind == "class_halted" && e.message.starts_with(&halt));
                prop_assert!(event.is_some_and(|e| e.message.contains(" on device d")), "{:?}", sim.events);
                prop_assert!(sim.devices.iter().filter(|d| &d.labels["class"] == class).all(|d| d.cohort != COHORT_CANDIDATE));
                continue;
            }
            let silent_in_b = sim.records.iter()
                .filter(|r| &r.class == class && outcome_of(r) == DeviceOutcome::Active)
                .any(|r| matches!(by_device[&r.device_id], Reported::Silent));
            if let Some(s) = status.filter(|s| s.verdict == GateVerdict::Pass as i32) {
                prop_assert!(deadline > 0 || !silent_in_b, "class {} passed waiting for a device: {}", class, s.reason);
            }
            if sim.state() == RolloutState::Completed {
                let samples = sim.records.iter()
                    .filter(|r| &r.class == class && outcome_of(r) == DeviceOutcome::Active)
                    .filter(|r| matches!(by_device[&r.device_id], Reported::Good))
                    .count() as u32;
                prop_assert!(samples >= min_devices, "class {} completed with {} samples: {}", class, samples, sim.rollout.message);
            }
        }
        let message = &sim.rollout.message;
        match sim.state() {
            RolloutState::Paused => prop_assert!(
                message.contains("too few quality results") || message.contains("fewer than min"), "{}", message
            ),
            RolloutState::Progressing => prop_assert!(
                deadline == 0 && message.contains("waiting for quality evaluations"), "{}", message
            ),
            _ => {}
        }
    }
}
