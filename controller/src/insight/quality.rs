//! Quality evaluations as the gates and views read them: each device's newest result of one (bundle,
//! suite) against a given baseline ([`Evaluations`]), the per-class summary a rollout status, a comparison
//! and a recommendation show ([`summarize`]), and the rollout's thresholds in the shared gate math's terms.
//! Pure: the engine, Compare and Recommend call it; the verdict itself is
//! `alki_shared::eval::quality::judge_class`.

use std::collections::{BTreeMap, HashMap};

use alki_shared::eval::quality::{Gate, Outcome, QualityGates};
use alki_shared::proto;

use crate::store::EvalSample;

/// Every device's results of one bundle with one suite (one per variant and baseline).
#[derive(Clone, Debug, Default)]
pub struct Evaluations {
    by_device: HashMap<String, Vec<EvalSample>>,
}

impl Evaluations {
    pub fn from_samples(samples: Vec<EvalSample>) -> Evaluations {
        let mut by_device: HashMap<String, Vec<EvalSample>> = HashMap::new();
        for s in samples {
            by_device.entry(s.device_id.clone()).or_default().push(s);
        }
        Evaluations { by_device }
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// The device's newest result against `baseline` (a bundle digest; None: the device had no baseline),
    /// whatever variant it evaluated.
    pub fn newest(&self, device_id: &str, baseline: Option<&str>) -> Option<&EvalSample> {
        let baseline = baseline.unwrap_or_default();
        self.by_device
            .get(device_id)?
            .iter()
            .filter(|s| s.baseline_bundle == baseline)
            .max_by_key(|s| s.received_unix_ms)
    }

    /// Every sample, grouped by (class, variant digest): a device counts once per group, its newest.
    pub fn by_class_and_variant(&self) -> BTreeMap<(String, String), Vec<&EvalSample>> {
        let mut groups: BTreeMap<(String, String), Vec<&EvalSample>> = BTreeMap::new();
        for samples in self.by_device.values() {
            let mut newest: BTreeMap<&str, &EvalSample> = BTreeMap::new();
            for s in samples {
                let slot = newest.entry(s.variant_digest.as_str()).or_insert(s);
                if s.received_unix_ms > slot.received_unix_ms {
                    *slot = s;
                }
            }
            for s in newest.into_values() {
                groups.entry((s.class.clone(), s.variant_digest.clone())).or_default().push(s);
            }
        }
        groups
    }
}

/// The worst values across the measured results (highest KLD and perplexity ratio, lowest top-1 agreement
/// and golden pass rate; a value that is not a number is the worst of all), and how many devices measured
/// or could not run.
pub fn summarize<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> proto::ClassQuality {
    let mut q = proto::ClassQuality::default();
    for outcome in outcomes {
        let Outcome::Measured(m) = outcome else {
            q.could_not_run += 1;
            continue;
        };
        q.measured += 1;
        for gate in Gate::ALL {
            let Some(v) = gate.sample(m) else { continue };
            let slot = match gate {
                Gate::Kld => &mut q.max_kld,
                Gate::Top1Agreement => &mut q.min_top1_agreement,
                Gate::PerplexityRatio => &mut q.max_perplexity_ratio,
                Gate::GoldenPass => &mut q.min_golden_pass,
            };
            let replace = match *slot {
                None => true,
                Some(old) if !old.is_finite() => false,
                Some(old) => !v.is_finite() || if gate.is_ceiling() { v > old } else { v < old },
            };
            if replace {
                *slot = Some(v);
            }
        }
    }
    q
}

/// "KL divergence 0.0012 (max 0.05), top-1 agreement 0.97 (min 0.9)": the worst values against the set
/// thresholds, for a passing class's reason.
pub fn describe(q: &proto::ClassQuality, gates: &QualityGates) -> String {
    let mut parts = Vec::new();
    for gate in Gate::ALL {
        let Some(limit) = gate.limit(gates) else { continue };
        let worst = match gate {
            Gate::Kld => q.max_kld,
            Gate::Top1Agreement => q.min_top1_agreement,
            Gate::PerplexityRatio => q.max_perplexity_ratio,
            Gate::GoldenPass => q.min_golden_pass,
        };
        let bound = if gate.is_ceiling() { "max" } else { "min" };
        if let Some(v) = worst {
            parts.push(format!("{} {v:.4} ({bound} {limit})", gate.metric()));
        }
    }
    format!("quality on {} devices: {}", q.measured, parts.join(", "))
}

/// Adds B's quality per class to a rollout's comparison: each device the rollout moved to B (returned to A
/// since or not: what it measured of B stays true) counts its newest evaluation against its own baseline,
/// as the quality gates count it.
pub fn fill_comparison(
    comparison: &mut proto::Comparison,
    records: &[proto::RolloutDevice],
    evaluations: &Evaluations,
) {
    let mut per_class: BTreeMap<&str, Vec<&Outcome>> = BTreeMap::new();
    for r in records {
        if let Some(sample) = evaluations.newest(&r.device_id, r.baseline.as_ref().map(|b| b.digest.as_str())) {
            per_class.entry(r.class.as_str()).or_default().push(&sample.outcome);
        }
    }
    for (class, outcomes) in per_class {
        let summary = summarize(outcomes);
        match comparison.classes.iter_mut().find(|c| c.class == class) {
            Some(c) => c.quality = Some(summary),
            None => comparison.classes.push(proto::ClassComparison {
                class: class.to_owned(),
                quality: Some(summary),
                ..Default::default()
            }),
        }
    }
    comparison.classes.sort_by(|a, b| a.class.cmp(&b.class));
}

pub use alki_shared::eval::wire::{floor_gates, rollout_gates};

#[cfg(test)]
pub(crate) mod tests {
    use alki_shared::eval::perplexity::{Estimate, KlDivergence, PerplexitySettings};
    use alki_shared::eval::quality::{CouldNotRun, EvalSettings, GoldenSummary, Measurement};

    use super::*;

    /// A measured outcome: `kld` also sets the perplexity ratio (1 + kld); golden is (prompts, passed).
    pub(crate) fn measured(kld: f64, top1: f64, golden: (u32, u32)) -> Outcome {
        let e = |value| Estimate { value, uncertainty: 0.0 };
        Outcome::Measured(Measurement {
            perplexity: Some(e(10.0)),
            kl_divergence: Some(KlDivergence {
                ppl: e(10.0),
                base_ppl: e(10.0),
                ppl_ratio: e(1.0 + kld),
                kld_mean: e(kld),
                kld_median: kld,
                kld_p99: kld * 4.0,
                kld_max: kld * 10.0,
                top1_agreement: e(top1),
            }),
            golden: GoldenSummary { prompts: golden.0, passed: golden.1, failures: Vec::new() },
            build: "b1".into(),
            settings: EvalSettings {
                perplexity: PerplexitySettings { context_size: 64, chunks: 4, threads: 0, gpu_layers: 0 },
                seed: 42,
            },
            duration_ms: 10,
        })
    }

    fn sample(device: &str, baseline: &str, received: i64, outcome: Outcome) -> EvalSample {
        EvalSample {
            device_id: device.into(),
            class: "pi".into(),
            variant_digest: "sha256:q8".into(),
            baseline_bundle: baseline.into(),
            baseline_variant: String::new(),
            rollout_id: String::new(),
            received_unix_ms: received,
            outcome,
        }
    }

    #[test]
    fn the_newest_result_against_the_device_s_baseline_counts() {
        let e = Evaluations::from_samples(vec![
            sample("d1", "sha256:aa", 1, measured(0.5, 0.5, (1, 1))),
            sample("d1", "sha256:aa", 3, measured(0.1, 0.9, (1, 1))),
            sample("d1", "sha256:other", 9, measured(9.0, 0.1, (1, 0))),
            sample("d2", "", 2, measured(0.2, 0.8, (1, 1))),
        ]);
        assert_eq!(e.newest("d1", Some("sha256:aa")).map(|s| s.received_unix_ms), Some(3));
        assert_eq!(e.newest("d2", None).map(|s| s.received_unix_ms), Some(2), "no baseline: golden prompts only");
        assert!(e.newest("d2", Some("sha256:aa")).is_none());
        assert!(e.newest("d3", None).is_none());
        let groups = e.by_class_and_variant();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[&("pi".to_owned(), "sha256:q8".to_owned())].len(), 2, "one result per device");
    }

    #[test]
    fn the_summary_keeps_the_worst_values_and_counts_devices() {
        let unable = Outcome::CouldNotRun(CouldNotRun::OutOfTime { budget_seconds: 1 });
        let outcomes = [measured(0.01, 0.99, (10, 10)), measured(0.2, 0.7, (10, 6)), unable];
        let q = summarize(&outcomes);
        assert_eq!((q.measured, q.could_not_run), (2, 1));
        assert_eq!((q.max_kld, q.min_top1_agreement, q.min_golden_pass), (Some(0.2), Some(0.7), Some(0.6)));
        assert_eq!(q.max_perplexity_ratio, Some(1.2));
        let garbage = [measured(f64::NAN, 0.99, (0, 0)), measured(0.3, 0.99, (0, 0))];
        let q = summarize(&garbage);
        assert!(q.max_kld.is_some_and(f64::is_nan), "garbage is the worst value: {q:?}");
        assert_eq!(q.min_golden_pass, None, "no golden prompts ran");
        let gates = QualityGates { max_kld: Some(0.05), min_top1_agreement: Some(0.9), ..Default::default() };
        let text = describe(&summarize(&outcomes[..1]), &gates);
        assert_eq!(text, "quality on 1 devices: KL divergence 0.0100 (max 0.05), top-1 agreement 0.9900 (min 0.9)");
    }
}
