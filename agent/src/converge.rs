//! Desired-state decisions, pure: which generation to apply, ignore or queue, and when the device already
//! serves what is asked. The agent converges to the newest generation it has seen; applying is idempotent.

use alki_shared::digest::Digest;
use alki_shared::ids::Generation;
use alki_shared::proto;

use crate::reference::BundleLocation;
use crate::settings::RuntimeOverrides;

/// A desired state as the agent understands it.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub generation: Generation,
    /// The bundle to serve, or why the reference cannot be used (the activation then fails for people to see).
    pub target: Result<BundleLocation, String>,
    pub overrides: RuntimeOverrides,
    pub rollout_id: String,
    pub cohort: String,
    /// The bundle as the controller named it, reported back in Status even when it is invalid.
    pub named: Option<proto::BundleRef>,
    /// The variant the controller prefers (recommended for the device's class), used when it fits.
    pub preferred_variant: Option<Digest>,
    /// Nothing is to be served (`DesiredState.serve_nothing`); `target` is then not used.
    pub serve_nothing: bool,
    /// The evaluation to run once the bundle is active (`eval_suite`), or why its references cannot be used.
    pub eval: Option<Result<EvalWanted, String>>,
}

/// What a desired state asks to evaluate the active bundle with, once it is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalWanted {
    pub suite: BundleLocation,
    /// What the device ran before, for KL divergence and top-1 agreement; None: no comparison.
    pub baseline: Option<BundleLocation>,
    pub baseline_variant: Option<Digest>,
}

impl EvalWanted {
    /// The evaluation a desired state names, if any.
    fn from_proto(d: &proto::DesiredState) -> Option<Result<EvalWanted, String>> {
        let suite = d.eval_suite.as_ref()?;
        let wanted = || -> Result<EvalWanted, String> {
            let suite = BundleLocation::from_proto(Some(suite)).map_err(|e| format!("eval suite: {e}"))?;
            let baseline = match &d.eval_baseline {
                Some(b) => Some(BundleLocation::from_proto(Some(b)).map_err(|e| format!("eval baseline: {e}"))?),
                None => None,
            };
            Ok(EvalWanted { suite, baseline, baseline_variant: d.eval_baseline_variant_digest.parse().ok() })
        };
        Some(wanted())
    }
}

impl Desired {
    pub fn from_proto(d: &proto::DesiredState) -> Desired {
        Desired {
            generation: Generation(d.generation),
            target: BundleLocation::from_proto(d.bundle.as_ref()).map_err(|e| e.to_string()),
            overrides: RuntimeOverrides::from_proto(d.runtime.as_ref()),
            rollout_id: d.rollout_id.clone(),
            cohort: d.cohort.clone(),
            named: d.bundle.clone(),
            // A malformed preference is only a preference: the device then chooses for itself.
            preferred_variant: d.variant_digest.parse().ok(),
            serve_nothing: d.serve_nothing,
            eval: EvalWanted::from_proto(d),
        }
    }
}

/// What the device serves now, as far as "is this already applied?" is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingKey {
    pub bundle_digest: Digest,
    pub overrides: RuntimeOverrides,
}

/// Why a desired state was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not newer than the last applied generation.
    Stale,
    /// The generation being applied (or already queued) again.
    Duplicate,
}

/// What to do with a desired state.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Ignore(Ignored),
    /// Kept until the activation in progress ends (only the newest is kept).
    Queued,
    /// The device already serves this bundle with these settings: report ACTIVE, no restart.
    AlreadyServing(Desired),
    /// Pull, verify, start and flip to it now.
    Activate(Desired),
}

/// The convergence bookkeeping: last applied, in progress, queued.
#[derive(Clone, Debug, Default)]
pub struct Converger {
    last_applied: Generation,
    in_progress: Option<Generation>,
    queued: Option<Desired>,
}

impl Converger {
    pub fn new(last_applied: Generation) -> Converger {
        Converger { last_applied, in_progress: None, queued: None }
    }

    pub fn last_applied(&self) -> Generation {
        self.last_applied
    }

    pub fn in_progress(&self) -> Option<Generation> {
        self.in_progress
    }

    /// Decides what to do with `desired`, given what is served now.
    pub fn offer(&mut self, desired: Desired, serving: Option<&ServingKey>) -> Decision {
        if desired.generation <= self.last_applied {
            return Decision::Ignore(Ignored::Stale);
        }
        if let Some(current) = self.in_progress {
            if desired.generation == current {
                return Decision::Ignore(Ignored::Duplicate);
            }
            if desired.generation < current {
                return Decision::Ignore(Ignored::Stale);
            }
            if let Some(queued) = &self.queued {
                if desired.generation == queued.generation {
                    return Decision::Ignore(Ignored::Duplicate);
                }
                if desired.generation < queued.generation {
                    return Decision::Ignore(Ignored::Stale);
                }
            }
            self.queued = Some(desired);
            return Decision::Queued;
        }
        let same = match (&desired.target, serving) {
            _ if desired.serve_nothing => serving.is_none(),
            (Ok(bundle), Some(key)) => bundle.digest == key.bundle_digest && desired.overrides == key.overrides,
            _ => false,
        };
        if same {
            self.last_applied = desired.generation;
            return Decision::AlreadyServing(desired);
        }
        self.in_progress = Some(desired.generation);
        Decision::Activate(desired)
    }

    /// Applies `desired` again: a retry of its failed activation (registry unreachable, ...). Ignored when a
    /// newer generation has been seen or an activation is in progress.
    pub fn retry(&mut self, desired: Desired) -> Decision {
        if self.in_progress.is_some() || self.queued.is_some() || desired.generation < self.last_applied {
            return Decision::Ignore(Ignored::Stale);
        }
        self.in_progress = Some(desired.generation);
        Decision::Activate(desired)
    }

    /// Forgets what was applied, so the next desired state is applied even if its generation is not newer:
    /// used when what was applied cannot be served any more (its files are gone after a restart).
    pub fn reopen(&mut self) {
        self.last_applied = Generation::default();
    }

    /// Records the end of the activation in progress (success or failure: either way the generation is
    /// applied) and hands back the queued desired state, to be offered next.
    pub fn finished(&mut self) -> Option<Desired> {
        if let Some(generation) = self.in_progress.take() {
            self.last_applied = self.last_applied.max(generation);
        }
        self.queued.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(name: &str) -> BundleLocation {
        BundleLocation {
            registry: String::new(),
            repository: "acme/tiny".into(),
            digest: Digest::of(name.as_bytes()),
            tag: String::new(),
        }
    }

    fn desired(generation: u64, name: &str) -> Desired {
        Desired {
            generation: Generation(generation),
            target: Ok(bundle(name)),
            overrides: RuntimeOverrides::default(),
            rollout_id: String::new(),
            cohort: String::new(),
            named: Some(bundle(name).to_proto()),
            preferred_variant: None,
            serve_nothing: false,
            eval: None,
        }
    }

    #[test]
    fn an_eval_suite_in_a_desired_state_is_read_with_its_baseline() {
        let mut d = proto::DesiredState { generation: 1, bundle: Some(bundle("b").to_proto()), ..Default::default() };
        assert_eq!(Desired::from_proto(&d).eval, None);
        d.eval_suite = Some(bundle("suite").to_proto());
        d.eval_baseline = Some(bundle("a").to_proto());
        d.eval_baseline_variant_digest = Digest::of(b"a-q8").to_string();
        let wanted = Desired::from_proto(&d).eval.expect("asked").expect("usable");
        assert_eq!(wanted.suite, bundle("suite"));
        assert_eq!((wanted.baseline, wanted.baseline_variant), (Some(bundle("a")), Some(Digest::of(b"a-q8"))));
        d.eval_suite = Some(proto::BundleRef { digest: "sha256:nope".into(), ..bundle("suite").to_proto() });
        let refused = Desired::from_proto(&d).eval.expect("asked").expect_err("bad digest");
        assert!(refused.starts_with("eval suite: "), "{refused}");
    }

    fn serving(name: &str) -> ServingKey {
        ServingKey { bundle_digest: Digest::of(name.as_bytes()), overrides: RuntimeOverrides::default() }
    }

    #[test]
    fn old_and_repeated_generations_are_ignored() {
        let mut c = Converger::new(Generation(5));
        assert_eq!(c.offer(desired(5, "a"), None), Decision::Ignore(Ignored::Stale));
        assert_eq!(c.offer(desired(3, "a"), None), Decision::Ignore(Ignored::Stale));
        assert!(matches!(c.offer(desired(6, "a"), None), Decision::Activate(_)));
        assert_eq!(c.offer(desired(6, "a"), None), Decision::Ignore(Ignored::Duplicate));
        assert_eq!(c.in_progress(), Some(Generation(6)));
    }

    #[test]
    fn newer_states_during_an_activation_are_queued_newest_only() {
        let mut c = Converger::new(Generation(0));
        assert!(matches!(c.offer(desired(1, "a"), None), Decision::Activate(_)));
        assert_eq!(c.offer(desired(2, "b"), None), Decision::Queued);
        assert_eq!(c.offer(desired(4, "d"), None), Decision::Queued);
        assert_eq!(c.offer(desired(3, "c"), None), Decision::Ignore(Ignored::Stale), "older than the queued one");
        assert_eq!(c.offer(desired(4, "d"), None), Decision::Ignore(Ignored::Duplicate));
        let next = c.finished().expect("queued state comes back");
        assert_eq!(next.generation, Generation(4));
        assert_eq!(c.last_applied(), Generation(1));
        assert!(matches!(c.offer(next, Some(&serving("a"))), Decision::Activate(d) if d.generation == Generation(4)));
        assert_eq!(c.finished(), None);
        assert_eq!(c.last_applied(), Generation(4));
    }

    #[test]
    fn the_same_bundle_and_settings_are_already_active() {
        let mut c = Converger::new(Generation(1));
        let decision = c.offer(desired(2, "a"), Some(&serving("a")));
        assert!(matches!(decision, Decision::AlreadyServing(_)));
        assert_eq!(c.last_applied(), Generation(2));
        assert_eq!(c.in_progress(), None);
        // Different settings for the same bundle need a restart.
        let mut with_ctx = desired(3, "a");
        with_ctx.overrides.context_size = 4096;
        assert!(matches!(c.offer(with_ctx, Some(&serving("a"))), Decision::Activate(_)));
    }

    #[test]
    fn serving_nothing_is_already_done_when_nothing_serves_and_an_activation_otherwise() {
        let nothing = |generation| {
            Desired::from_proto(&proto::DesiredState { generation, serve_nothing: true, ..Default::default() })
        };
        let mut c = Converger::new(Generation(1));
        assert!(matches!(c.offer(nothing(2), Some(&serving("a"))), Decision::Activate(d) if d.serve_nothing));
        c.finished();
        assert!(matches!(c.offer(nothing(3), None), Decision::AlreadyServing(d) if d.serve_nothing));
        assert_eq!(c.last_applied(), Generation(3));
    }

    #[test]
    fn a_failed_activation_still_counts_as_applied() {
        let mut c = Converger::new(Generation(0));
        let mut bad = desired(7, "x");
        bad.target = Err("the desired state names no bundle".into());
        assert!(matches!(c.offer(bad, Some(&serving("a"))), Decision::Activate(_)));
        assert_eq!(c.finished(), None);
        assert_eq!(c.last_applied(), Generation(7));
        assert_eq!(c.offer(desired(7, "x"), None), Decision::Ignore(Ignored::Stale));
    }

    #[test]
    fn a_failed_generation_can_be_retried_until_a_newer_one_arrives() {
        let mut c = Converger::new(Generation(0));
        assert!(matches!(c.offer(desired(3, "a"), None), Decision::Activate(_)));
        c.finished();
        assert!(matches!(c.retry(desired(3, "a")), Decision::Activate(_)), "the same generation again");
        assert_eq!(c.offer(desired(3, "a"), None), Decision::Ignore(Ignored::Stale));
        c.finished();
        assert!(matches!(c.offer(desired(4, "b"), None), Decision::Activate(_)));
        c.finished();
        assert_eq!(c.retry(desired(3, "a")), Decision::Ignore(Ignored::Stale), "superseded");
    }

    #[test]
    fn reopening_applies_the_same_generation_again() {
        let mut c = Converger::new(Generation(5));
        assert_eq!(c.offer(desired(5, "a"), None), Decision::Ignore(Ignored::Stale));
        c.reopen();
        assert!(matches!(c.offer(desired(5, "a"), None), Decision::Activate(_)));
    }

    #[test]
    fn desired_states_from_the_wire_are_validated() {
        let wire = proto::DesiredState {
            generation: 9,
            bundle: Some(bundle("a").to_proto()),
            runtime: Some(proto::RuntimeSettings { context_size: 512, ..Default::default() }),
            rollout_id: "ro-1".into(),
            cohort: "B".into(),
            ..Default::default()
        };
        let d = Desired::from_proto(&wire);
        assert_eq!(d.generation, Generation(9));
        assert_eq!(d.target, Ok(bundle("a")));
        assert_eq!(d.overrides.context_size, 512);
        let empty = Desired::from_proto(&proto::DesiredState { generation: 10, ..Default::default() });
        assert!(empty.target.is_err());
    }
}
