//! Fuzzes the agent's handling of DesiredState (stable Rust, proptest): arbitrary messages, including
//! hostile references (bad digests, traversal in repository names, huge numbers) and raw protobuf bytes,
//! become a `Desired` without panicking, and a bad reference is kept as an error to report rather than
//! served; random sequences of offers, finishes, retries and reopenings keep the convergence rules: never two
//! activations at once, never an older generation after a newer one, never "already serving" a bundle the
//! device does not serve.
//!
//! `ALKI_FUZZ_CASES` sets the number of cases (default 256, what CI runs).

use std::sync::atomic::{AtomicU64, Ordering};

use alki_agent::converge::{Converger, Decision, Desired, ServingKey};
use alki_agent::settings::RuntimeOverrides;
use alki_shared::digest::Digest;
use alki_shared::ids::Generation;
use alki_shared::proto;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;

fn cases() -> u32 {
    std::env::var("ALKI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// The few bundles sequences draw from, so "already serving" comes up.
fn digest_of(n: u8) -> String {
    Digest::of(&[n]).to_string()
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/._-]{0,30}",
        Just("../../etc".to_owned()),
        Just("acme/../../root".to_owned()),
        Just("/abs".to_owned()),
        Just("sha256:".to_owned()),
        Just(format!("sha256:{}", "g".repeat(64))),
        ".{0,60}",
    ]
}

fn bundle_ref() -> impl Strategy<Value = Option<proto::BundleRef>> {
    let digest = prop_oneof![3 => (0u8..4).prop_map(digest_of), 1 => text()];
    let repository = prop_oneof![3 => Just("acme/qwen".to_owned()), 1 => text()];
    let registry = prop_oneof![Just(String::new()), Just("127.0.0.1:5000".to_owned()), text()];
    prop_oneof![
        1 => Just(None),
        6 => (registry, repository, digest, text())
            .prop_map(|(registry, repository, digest, tag)| Some(proto::BundleRef { registry, repository, digest, tag })),
    ]
}

fn desired_state() -> impl Strategy<Value = proto::DesiredState> {
    let runtime = prop::option::of((0u32..3, any::<u32>(), any::<i32>(), 0u32..3).prop_map(|(c, t, g, p)| {
        proto::RuntimeSettings { context_size: c, threads: t % 3, gpu_layers: g % 2, parallel_slots: p }
    }));
    (0u64..12, bundle_ref(), runtime, text(), text(), text(), any::<bool>()).prop_map(
        |(generation, bundle, runtime, rollout_id, cohort, variant_digest, serve_nothing)| proto::DesiredState {
            generation,
            bundle,
            runtime,
            rollout_id,
            cohort,
            variant_digest,
            serve_nothing,
            ..Default::default()
        },
    )
}

#[derive(Clone, Debug)]
enum Op {
    Offer(proto::DesiredState),
    Finished,
    Retry(proto::DesiredState),
    Reopen,
    /// What the device serves changes (after an activation, or a bundle it already had).
    Serve(Option<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => desired_state().prop_map(Op::Offer),
        3 => Just(Op::Finished),
        1 => desired_state().prop_map(Op::Retry),
        1 => Just(Op::Reopen),
        2 => prop::option::of(0u8..4).prop_map(Op::Serve),
    ]
}

#[test]
fn any_desired_state_converts_without_panicking_and_bad_references_stay_errors() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&desired_state(), |state| {
            executed.fetch_add(1, Ordering::Relaxed);
            let desired = Desired::from_proto(&state);
            prop_assert_eq!(desired.generation, Generation(state.generation));
            let named = state.bundle.clone();
            prop_assert_eq!(&desired.named, &named);
            if let Ok(location) = &desired.target {
                // Only a well-formed reference becomes something to pull.
                let bundle = named.expect("a target needs a reference");
                prop_assert_eq!(location.digest.to_string(), bundle.digest);
                prop_assert!(!location.repository.is_empty());
                prop_assert!(!location.repository.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!location.repository.starts_with('/'));
            }
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_desired from_proto: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}

#[test]
fn raw_bytes_decode_or_fail_and_never_panic() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            executed.fetch_add(1, Ordering::Relaxed);
            if let Ok(message) = proto::ControllerMessage::decode(bytes.as_slice())
                && let Some(proto::controller_message::Msg::DesiredState(state)) = message.msg
            {
                let _ = Desired::from_proto(&state);
            }
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_desired raw bytes: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}

#[test]
fn random_sequences_keep_the_convergence_rules() {
    let executed = AtomicU64::new(0);
    runner()
        .run(&(0u64..4, prop::collection::vec(op(), 1..40)), |(start, ops)| {
            executed.fetch_add(1, Ordering::Relaxed);
            let mut converger = Converger::new(Generation(start));
            let mut serving: Option<ServingKey> = None;
            let mut activating: Option<Generation> = None;
            for op in ops {
                let before = converger.last_applied();
                // Reopening is the one step that may move last-applied back (to zero).
                let reopening = matches!(op, Op::Reopen);
                match op {
                    Op::Offer(state) => {
                        let desired = Desired::from_proto(&state);
                        let generation = desired.generation;
                        let again = desired.clone();
                        match converger.offer(desired, serving.as_ref()) {
                            Decision::Activate(d) => {
                                prop_assert!(activating.is_none(), "two activations at once");
                                prop_assert!(d.generation > before, "activated {:?} after {:?}", d.generation, before);
                                activating = Some(d.generation);
                                // Offering the same again while it runs is a duplicate.
                                prop_assert!(matches!(converger.offer(again, serving.as_ref()), Decision::Ignore(_)));
                            }
                            Decision::AlreadyServing(d) if d.serve_nothing => {
                                prop_assert!(activating.is_none());
                                prop_assert!(serving.is_none(), "serving nothing is done only when nothing serves");
                                prop_assert_eq!(converger.last_applied(), generation);
                            }
                            Decision::AlreadyServing(d) => {
                                prop_assert!(activating.is_none());
                                let key = serving.as_ref().expect("serving something");
                                let target = d.target.as_ref().expect("a valid target");
                                prop_assert_eq!(&target.digest, &key.bundle_digest);
                                prop_assert_eq!(converger.last_applied(), generation);
                            }
                            Decision::Queued => prop_assert!(activating.is_some(), "queued with nothing running"),
                            Decision::Ignore(_) => prop_assert_eq!(converger.last_applied(), before),
                        }
                    }
                    Op::Retry(state) => {
                        if let Decision::Activate(d) = converger.retry(Desired::from_proto(&state)) {
                            prop_assert!(activating.is_none(), "a retry during an activation");
                            prop_assert!(d.generation >= before);
                            activating = Some(d.generation);
                        }
                    }
                    Op::Finished => {
                        let queued = converger.finished();
                        if let Some(g) = activating.take() {
                            prop_assert!(converger.last_applied() >= g);
                        }
                        if let Some(next) = queued {
                            prop_assert!(next.generation > converger.last_applied(), "a stale state was queued");
                            if let Decision::Activate(d) = converger.offer(next, serving.as_ref()) {
                                activating = Some(d.generation);
                            }
                        }
                    }
                    Op::Reopen => {
                        converger.reopen();
                        prop_assert_eq!(converger.last_applied(), Generation::default());
                    }
                    Op::Serve(bundle) => {
                        serving = bundle
                            .and_then(|n| digest_of(n).parse().ok())
                            .map(|bundle_digest| ServingKey { bundle_digest, overrides: RuntimeOverrides::default() });
                    }
                }
                prop_assert_eq!(converger.in_progress(), activating);
                if !reopening {
                    prop_assert!(converger.last_applied() >= before, "last applied went backwards");
                }
            }
            Ok(())
        })
        .expect("no failing case");
    eprintln!("fuzz_desired sequences: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
}
