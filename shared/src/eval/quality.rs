//! The quality result a device reports for one candidate and one suite (or why it could not run it), and
//! the pure quality gates a rollout judges each hardware class by.
//!
//! # Gate semantics
//!
//! [`judge_class`] takes the thresholds ([`QualityGates`], each optional), the results of one class's
//! candidate devices for one suite (one per device, the newest), and a minimum sample count.
//!
//! 1. **Nothing to judge.** With no threshold set the class passes, without waiting for any result.
//! 2. **Samples.** A device's metrics: KLD = its mean KL divergence from the baseline, top-1 = the fraction
//!    of tokens where candidate and baseline agree on the most likely one, perplexity ratio = PPL(B)/PPL(A)
//!    on the same tokens (all three from one KL-divergence run against the baseline it replaces), golden
//!    pass = golden prompts passed / prompts run. A device that could not run the suite, or did not measure
//!    a metric (no baseline on the device, no golden prompts in the suite), gives no sample of that metric.
//! 3. **Fail** when any sample breaks a set threshold: KLD > `max_kld`, top-1 < `min_top1_agreement`,
//!    ratio > `max_perplexity_ratio`, golden pass < `min_golden_pass`. A value that is not a finite number
//!    (NaN, ±inf: a build computing garbage) breaks any threshold it is judged by. Quality is a floor for
//!    every device, not an average: one device computing garbage serves garbage. A breach is a fact that
//!    more samples cannot undo, so a failure does not wait for `min_samples`. The verdict names the first
//!    broken gate in the order above, the worst value of that gate in the class (ties: the smallest device
//!    id), its device, the limit, and how many of the devices that measured it break it.
//! 4. **Inconclusive** otherwise, when a set threshold has fewer than `min_samples` samples (0 counts as 1):
//!    the reason names the gate, the counts, and why devices could not run. The rollout holds for a human,
//!    as it does for the speed gates.
//! 5. **Pass** otherwise.
//!
//! The verdict does not depend on the order of the results. `verdicts_hold_to_the_specification` below
//! checks these rules on generated classes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::checks::CheckFailure;
use super::perplexity::{Estimate, KlDivergence, PerplexitySettings};
use crate::digest::Digest;

/// What one device found evaluating one candidate with one suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityResult {
    /// The suite's manifest digest.
    pub suite: Digest,
    /// The candidate variant's manifest digest.
    pub candidate: Digest,
    /// The baseline variant it was compared with, when the device had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Digest>,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Measured(Measurement),
    CouldNotRun(CouldNotRun),
}

/// The measurements of a completed evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// The candidate's perplexity on the corpus (the KL-divergence run's PPL(Q) when there is a baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<Estimate>,
    /// The candidate against the baseline, when the device had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_divergence: Option<KlDivergence>,
    pub golden: GoldenSummary,
    /// The llama.cpp build that ran it (`llama-server --version`, or the runtime build's digest).
    pub build: String,
    pub settings: EvalSettings,
    pub duration_ms: u64,
}

/// How the evaluation was run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    pub perplexity: PerplexitySettings,
    /// The golden prompts' sampler seed (at temperature 0).
    pub seed: u32,
}

/// The golden prompts' outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSummary {
    /// Prompts run.
    pub prompts: u32,
    /// Prompts whose every check passed.
    pub passed: u32,
    /// Every failed check, naming its prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<CheckFailure>,
}

impl GoldenSummary {
    /// The summary of `prompts` prompts run with these failures (a prompt fails when any of its checks does).
    pub fn new(prompts: u32, failures: Vec<CheckFailure>) -> GoldenSummary {
        let mut failed: Vec<&str> = failures.iter().map(|f| f.prompt.as_str()).collect();
        failed.sort_unstable();
        failed.dedup();
        let passed = prompts.saturating_sub(failed.len() as u32);
        GoldenSummary { prompts, passed, failures }
    }

    /// Passed / run; None when no prompt ran.
    pub fn pass_fraction(&self) -> Option<f64> {
        (self.prompts > 0).then(|| f64::from(self.passed) / f64::from(self.prompts))
    }
}

/// Why a device did not evaluate: said instead of failing the rollout silently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case", deny_unknown_fields)]
pub enum CouldNotRun {
    /// The candidate does not fit in memory beside what is served.
    DoesNotFit { needed_bytes: u64, available_bytes: u64 },
    /// The estimated run time exceeds the suite's time budget on this device.
    SuiteTooLargeForBudget { estimated_seconds: u64, budget_seconds: u32 },
    /// The run started but did not finish within the budget.
    OutOfTime { budget_seconds: u32 },
    /// The llama.cpp build has no such tool (e.g. a runtime build without llama-perplexity).
    ToolMissing { tool: String },
    /// The tools failed; the text says how.
    Failed { problem: String },
}

impl CouldNotRun {
    /// A short name of the kind, to count devices by.
    pub fn kind(&self) -> &'static str {
        match self {
            CouldNotRun::DoesNotFit { .. } => "does not fit",
            CouldNotRun::SuiteTooLargeForBudget { .. } => "suite too large for the budget",
            CouldNotRun::OutOfTime { .. } => "out of time",
            CouldNotRun::ToolMissing { .. } => "tool missing",
            CouldNotRun::Failed { .. } => "failed",
        }
    }
}

impl fmt::Display for CouldNotRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: &u64| *b as f64 / f64::from(1 << 20);
        match self {
            CouldNotRun::DoesNotFit { needed_bytes, available_bytes } => write!(
                f,
                "does not fit: needs {:.0} MiB beside what is served, {:.0} MiB available",
                mib(needed_bytes),
                mib(available_bytes)
            ),
            CouldNotRun::SuiteTooLargeForBudget { estimated_seconds, budget_seconds } => write!(
                f,
                "suite too large for the budget: about {estimated_seconds} s here, {budget_seconds} s allowed"
            ),
            CouldNotRun::OutOfTime { budget_seconds } => write!(f, "out of time: not done within {budget_seconds} s"),
            CouldNotRun::ToolMissing { tool } => write!(f, "tool missing: the llama.cpp build has no {tool}"),
            CouldNotRun::Failed { problem } => write!(f, "failed: {problem}"),
        }
    }
}

/// A rollout's quality thresholds; None leaves a gate off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityGates {
    /// Highest mean KL divergence from the baseline (`--max-kld`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kld: Option<f64>,
    /// Lowest top-1 agreement with the baseline, 0..=1 (`--min-top1-agreement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_agreement: Option<f64>,
    /// Highest PPL(B)/PPL(A) (`--max-perplexity-ratio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_perplexity_ratio: Option<f64>,
    /// Lowest fraction of golden prompts passed, 0..=1 (`--min-golden-pass`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_golden_pass: Option<f64>,
}

/// A threshold that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag}: {problem}; {fix}")]
pub struct GateError {
    pub flag: &'static str,
    pub problem: String,
    pub fix: &'static str,
}

/// One quality gate, in the order they are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    Kld,
    Top1Agreement,
    PerplexityRatio,
    GoldenPass,
}

impl Gate {
    pub const ALL: [Gate; 4] = [Gate::Kld, Gate::Top1Agreement, Gate::PerplexityRatio, Gate::GoldenPass];

    /// The CLI flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Gate::Kld => "--max-kld",
            Gate::Top1Agreement => "--min-top1-agreement",
            Gate::PerplexityRatio => "--max-perplexity-ratio",
            Gate::GoldenPass => "--min-golden-pass",
        }
    }

    /// What it measures, for people.
    pub fn metric(self) -> &'static str {
        match self {
            Gate::Kld => "KL divergence",
            Gate::Top1Agreement => "top-1 agreement",
            Gate::PerplexityRatio => "perplexity ratio",
            Gate::GoldenPass => "golden pass rate",
        }
    }

    /// True for a ceiling (the value must not exceed the limit), false for a floor.
    pub fn is_ceiling(self) -> bool {
        matches!(self, Gate::Kld | Gate::PerplexityRatio)
    }

    pub fn limit(self, gates: &QualityGates) -> Option<f64> {
        match self {
            Gate::Kld => gates.max_kld,
            Gate::Top1Agreement => gates.min_top1_agreement,
            Gate::PerplexityRatio => gates.max_perplexity_ratio,
            Gate::GoldenPass => gates.min_golden_pass,
        }
    }

    /// The device's sample of this gate's metric, if it measured it.
    pub fn sample(self, m: &Measurement) -> Option<f64> {
        match self {
            Gate::Kld => m.kl_divergence.map(|k| k.kld_mean.value),
            Gate::Top1Agreement => m.kl_divergence.map(|k| k.top1_agreement.value),
            Gate::PerplexityRatio => m.kl_divergence.map(|k| k.ppl_ratio.value),
            Gate::GoldenPass => m.golden.pass_fraction(),
        }
    }

    /// True when `value` breaks `limit`; a value that is not a finite number always does.
    pub fn breaks(self, value: f64, limit: f64) -> bool {
        !value.is_finite() || if self.is_ceiling() { value > limit } else { value < limit }
    }
}

impl QualityGates {
    pub fn is_empty(&self) -> bool {
        Gate::ALL.iter().all(|g| g.limit(self).is_none())
    }

    /// Checks every threshold is a usable number in its range.
    pub fn validate(&self) -> Result<(), GateError> {
        for gate in Gate::ALL {
            let Some(limit) = gate.limit(self) else { continue };
            let (ok, fix) = match gate {
                Gate::Kld => (limit >= 0.0, "give a KL divergence of 0 or more, e.g. 0.05"),
                Gate::Top1Agreement | Gate::GoldenPass => {
                    ((0.0..=1.0).contains(&limit), "give a fraction from 0 to 1, e.g. 0.9")
                }
                Gate::PerplexityRatio => (limit > 0.0, "give a ratio above 0, e.g. 1.05 for at most 5% worse"),
            };
            if !limit.is_finite() || !ok {
                return Err(GateError { flag: gate.flag(), problem: format!("{limit} is out of range"), fix });
            }
        }
        Ok(())
    }
}

/// A class's quality verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(Breach),
    Inconclusive { why: String },
}

/// The gate a class breaks, with the values that show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Breach {
    pub gate: Gate,
    /// The worst value of the gate's metric in the class.
    pub measured: f64,
    pub limit: f64,
    /// The device that measured it.
    pub device: String,
    /// Devices whose sample breaks the gate.
    pub breaking: usize,
    /// Devices with a sample of the gate's metric.
    pub samples: usize,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.gate.is_ceiling() { ">" } else { "<" };
        write!(
            f,
            "{} {:.4} {op} {} {} on device {} ({} of {} measured devices break it)",
            self.gate.metric(),
            self.measured,
            self.gate.flag(),
            self.limit,
            self.device,
            self.breaking,
            self.samples
        )
    }
}

/// Judges one hardware class by the rules in the module documentation.
pub fn judge_class<'a>(
    gates: &QualityGates,
    results: impl IntoIterator<Item = (&'a str, &'a Outcome)>,
    min_samples: u32,
) -> Verdict {
    if gates.is_empty() {
        return Verdict::Pass;
    }
    let results: Vec<(&str, &Outcome)> = results.into_iter().collect();
    let set: Vec<(Gate, f64)> = Gate::ALL.iter().filter_map(|g| g.limit(gates).map(|l| (*g, l))).collect();
    if let Some(breach) = set.iter().find_map(|(gate, limit)| breach(*gate, *limit, &results)) {
        return Verdict::Fail(breach);
    }
    let needed = min_samples.max(1) as usize;
    let short: Vec<String> = set
        .iter()
        .map(|(gate, _)| (gate, samples(*gate, &results).count()))
        .filter(|(_, n)| *n < needed)
        .map(|(gate, n)| format!("{} measured on {n} of {} devices", gate.metric(), results.len()))
        .collect();
    if short.is_empty() {
        return Verdict::Pass;
    }
    let mut why = format!("too few quality results ({needed} needed): {}", short.join(", "));
    let unable = could_not_run_tally(&results);
    if !unable.is_empty() {
        why.push_str(&format!("; could not run: {unable}"));
    }
    Verdict::Inconclusive { why }
}

/// Each device's sample of `gate`.
fn samples<'r, 'a>(gate: Gate, results: &'r [(&'a str, &'a Outcome)]) -> impl Iterator<Item = (&'a str, f64)> + 'r {
    results.iter().filter_map(move |(device, outcome)| match outcome {
        Outcome::Measured(m) => gate.sample(m).map(|v| (*device, v)),
        Outcome::CouldNotRun(_) => None,
    })
}

fn breach(gate: Gate, limit: f64, results: &[(&str, &Outcome)]) -> Option<Breach> {
    let all: Vec<(&str, f64)> = samples(gate, results).collect();
    let breaking: Vec<&(&str, f64)> = all.iter().filter(|(_, v)| gate.breaks(*v, limit)).collect();
    let (device, measured) = breaking.iter().copied().min_by(|a, b| worse_first(gate, **a, **b))?;
    Some(Breach {
        gate,
        measured: *measured,
        limit,
        device: (*device).to_owned(),
        breaking: breaking.len(),
        samples: all.len(),
    })
}

/// Orders samples worst first: values that are not finite, then the furthest past the limit, then by device id.
fn worse_first(gate: Gate, (da, a): (&str, f64), (db, b): (&str, f64)) -> std::cmp::Ordering {
    let badness = |v: f64| if v.is_finite() { (0, if gate.is_ceiling() { -v } else { v }) } else { (-1, 0.0) };
    let (ka, kb) = (badness(a), badness(b));
    ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(da.cmp(db))
}

/// `does not fit: 2, failed: 1`, in name order.
fn could_not_run_tally(results: &[(&str, &Outcome)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, outcome) in results {
        if let Outcome::CouldNotRun(why) = outcome {
            *counts.entry(why.kind()).or_default() += 1;
        }
    }
    counts.iter().map(|(kind, n)| format!("{kind}: {n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kl(kld: f64, top1: f64, ratio: f64) -> KlDivergence {
        let e = |value| Estimate { value, uncertainty: 0.0 };
        KlDivergence {
            ppl: e(10.0 * ratio),
            base_ppl: e(10.0),
            ppl_ratio: e(ratio),
            kld_mean: e(kld),
            kld_median: kld,
            kld_p99: kld * 4.0,
            kld_max: kld * 10.0,
            top1_agreement: e(top1),
        }
    }

    fn measured(kl_divergence: Option<KlDivergence>, golden: (u32, u32)) -> Outcome {
        Outcome::Measured(Measurement {
            perplexity: kl_divergence.map(|k| k.ppl),
            kl_divergence,
            golden: GoldenSummary { prompts: golden.0, passed: golden.1, failures: Vec::new() },
            build: "0.6.0-dev (build 0, commit unknown)".into(),
            settings: EvalSettings {
                perplexity: PerplexitySettings { context_size: 128, chunks: 16, threads: 0, gpu_layers: 0 },
                seed: 42,
            },
            duration_ms: 1234,
        })
    }

    fn gates() -> QualityGates {
        QualityGates {
            max_kld: Some(0.05),
            min_top1_agreement: Some(0.9),
            max_perplexity_ratio: Some(1.05),
            min_golden_pass: Some(0.8),
        }
    }

    fn judge(results: &[(&str, Outcome)], min_samples: u32) -> Verdict {
        judge_class(&gates(), results.iter().map(|(d, o)| (*d, o)), min_samples)
    }

    #[test]
    fn a_close_candidate_passes_once_enough_devices_measured_it() {
        let good = || measured(Some(kl(0.001, 0.99, 1.001)), (20, 20));
        assert_eq!(judge(&[("a", good()), ("b", good())], 2), Verdict::Pass);
        let Verdict::Inconclusive { why } = judge(&[("a", good())], 2) else { panic!("one device of two") };
        assert!(why.contains("KL divergence measured on 1 of 1 devices"), "{why}");
        assert_eq!(judge_class(&QualityGates::default(), [], 3), Verdict::Pass, "no gate, nothing to wait for");
    }

    #[test]
    fn a_far_candidate_fails_naming_the_gate_the_value_and_the_device() {
        let results = [
            ("a", measured(Some(kl(0.001, 0.99, 1.0)), (20, 20))),
            ("b", measured(Some(kl(2.5, 0.31, 3.2)), (20, 20))),
            ("c", measured(Some(kl(1.5, 0.40, 2.0)), (20, 20))),
        ];
        let Verdict::Fail(breach) = judge(&results, 10) else { panic!("far from A") };
        assert_eq!((breach.gate, breach.measured, breach.device.as_str()), (Gate::Kld, 2.5, "b"));
        assert_eq!((breach.breaking, breach.samples), (2, 3));
        assert_eq!(
            breach.to_string(),
            "KL divergence 2.5000 > --max-kld 0.05 on device b (2 of 3 measured devices break it)"
        );
    }

    #[test]
    fn a_broken_template_fails_the_golden_gate_alone() {
        let results = [("a", measured(Some(kl(0.0, 1.0, 1.0)), (20, 3)))];
        let Verdict::Fail(breach) = judge(&results, 1) else { panic!("golden prompts fail") };
        assert_eq!((breach.gate, breach.measured, breach.limit), (Gate::GoldenPass, 0.15, 0.8));
        assert!(breach.to_string().starts_with("golden pass rate 0.1500 < --min-golden-pass 0.8"), "{breach}");
    }

    #[test]
    fn garbage_numbers_fail_and_devices_that_could_not_run_are_named() {
        let nan = [("a", measured(Some(kl(f64::NAN, 0.99, 1.0)), (1, 1)))];
        assert!(matches!(judge(&nan, 1), Verdict::Fail(Breach { gate: Gate::Kld, .. })));
        let results = [
            ("a", measured(Some(kl(0.0, 1.0, 1.0)), (1, 1))),
            ("b", Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes: 1 << 30, available_bytes: 1 << 29 })),
            (
                "c",
                Outcome::CouldNotRun(CouldNotRun::SuiteTooLargeForBudget {
                    estimated_seconds: 900,
                    budget_seconds: 300,
                }),
            ),
            // Ran nothing before: no baseline, so golden prompts only.
            ("d", measured(None, (1, 1))),
        ];
        let Verdict::Inconclusive { why } = judge(&results, 2) else { panic!("too few samples") };
        assert_eq!(
            why,
            "too few quality results (2 needed): KL divergence measured on 1 of 4 devices, top-1 agreement measured on \
             1 of 4 devices, perplexity ratio measured on 1 of 4 devices; could not run: does not fit: 1, suite too \
             large for the budget: 1"
        );
    }

    #[test]
    fn thresholds_are_validated() {
        assert_eq!(gates().validate(), Ok(()));
        let bad = [
            QualityGates { max_kld: Some(-0.1), ..QualityGates::default() },
            QualityGates { min_top1_agreement: Some(90.0), ..QualityGates::default() },
            QualityGates { max_perplexity_ratio: Some(0.0), ..QualityGates::default() },
            QualityGates { min_golden_pass: Some(f64::NAN), ..QualityGates::default() },
        ];
        for (gates, flag) in bad.iter().zip(Gate::ALL.map(Gate::flag)) {
            assert_eq!(gates.validate().expect_err(flag).flag, flag);
        }
    }

    #[test]
    fn results_round_trip_through_json_with_their_reasons() {
        let result = QualityResult {
            suite: Digest::of(b"suite"),
            candidate: Digest::of(b"b"),
            baseline: Some(Digest::of(b"a")),
            outcome: measured(Some(kl(0.01, 0.95, 1.01)), (2, 1)),
        };
        let back: QualityResult = serde_json::from_slice(&serde_json::to_vec(&result).expect("json")).expect("parse");
        assert_eq!(back, result);
        let unable =
            Outcome::CouldNotRun(CouldNotRun::SuiteTooLargeForBudget { estimated_seconds: 420, budget_seconds: 300 });
        let json = serde_json::to_value(&unable).expect("json");
        assert_eq!(json["could_not_run"]["reason"], "suite_too_large_for_budget");
        let Outcome::CouldNotRun(why) = &unable else { unreachable!() };
        assert_eq!(why.to_string(), "suite too large for the budget: about 420 s here, 300 s allowed");
        let dnf = CouldNotRun::DoesNotFit { needed_bytes: 3 << 30, available_bytes: 1 << 30 };
        assert_eq!(dnf.to_string(), "does not fit: needs 3072 MiB beside what is served, 1024 MiB available");
    }

    #[test]
    fn golden_summaries_count_prompts_not_checks() {
        let failure = |prompt: &str, check| CheckFailure {
            prompt: prompt.into(),
            check,
            label: "exact \"x\"".into(),
            reason: "no".into(),
        };
        let summary = GoldenSummary::new(5, vec![failure("p1", 1), failure("p1", 2), failure("p3", 1)]);
        assert_eq!((summary.prompts, summary.passed, summary.pass_fraction()), (5, 3, Some(0.6)));
        assert_eq!(GoldenSummary::new(0, Vec::new()).pass_fraction(), None);
    }

    fn metric() -> impl Strategy<Value = f64> {
        prop_oneof![
            8 => 0.0..1.2f64,
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
        ]
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            6 => (proptest::option::of((metric(), metric(), 0.5..1.5f64)), 0u32..4, 0u32..4).prop_map(|(k, prompts, passed)| {
                measured(k.map(|(kld, top1, ratio)| kl(kld, top1, ratio)), (prompts, passed.min(prompts)))
            }),
            1 => Just(Outcome::CouldNotRun(CouldNotRun::OutOfTime { budget_seconds: 60 })),
        ]
    }

    fn thresholds() -> impl Strategy<Value = QualityGates> {
        let limit = |r: std::ops::Range<f64>| proptest::option::of(r);
        (limit(0.0..1.0), limit(0.0..1.0), limit(0.9..1.3), limit(0.0..1.0)).prop_map(|(a, b, c, d)| QualityGates {
            max_kld: a,
            min_top1_agreement: b,
            max_perplexity_ratio: c,
            min_golden_pass: d,
        })
    }

    proptest! {
        #[test]
        fn verdicts_hold_to_the_specification(
            gates in thresholds(),
            outcomes in proptest::collection::vec(outcome(), 0..6),
            min_samples in 0u32..4,
        ) {
            let names: Vec<String> = (0..outcomes.len()).map(|i| format!("d{i}")).collect();
            let results: Vec<(&str, &Outcome)> = names.iter().map(String::as_str).zip(&outcomes).collect();
            let verdict = judge_class(&gates, results.iter().copied(), min_samples);

            // The order of results does not matter (compared as text: a NaN measured is not equal to itself).
            let reversed = judge_class(&gates, results.iter().rev().copied(), min_samples);
            prop_assert_eq!(format!("{reversed:?}"), format!("{verdict:?}"));
            if gates.is_empty() {
                prop_assert_eq!(verdict, Verdict::Pass);
                return Ok(());
            }
            let set: Vec<(Gate, f64)> = Gate::ALL.iter().filter_map(|g| g.limit(&gates).map(|l| (*g, l))).collect();
            let samples_of = |gate: Gate| -> Vec<(&str, f64)> { samples(gate, &results).collect() };
            let first_broken = set.iter().find(|(g, l)| samples_of(*g).iter().any(|(_, v)| g.breaks(*v, *l)));
            match (&verdict, first_broken) {
                (Verdict::Fail(b), Some((gate, limit))) => {
                    prop_assert_eq!(b.gate, *gate);
                    prop_assert_eq!(b.limit, *limit);
                    let all = samples_of(*gate);
                    prop_assert!(all.iter().any(|(d, v)| *d == b.device && v.to_bits() == b.measured.to_bits()));
                    prop_assert!(gate.breaks(b.measured, *limit));
                    // Nothing in the class is worse than the value named.
                    let worse = |v: f64| if gate.is_ceiling() { v > b.measured } else { v < b.measured };
                    if b.measured.is_finite() {
                        prop_assert!(all.iter().all(|(_, v)| v.is_finite() && !worse(*v)));
                    }
                    prop_assert_eq!(b.breaking, all.iter().filter(|(_, v)| gate.breaks(*v, *limit)).count());
                    prop_assert_eq!(b.samples, all.len());
                }
                (Verdict::Fail(_), None) => prop_assert!(false, "failed without a broken gate"),
                (_, Some(_)) => prop_assert!(false, "a broken gate did not fail: {:?}", verdict),
                (Verdict::Inconclusive { .. }, None) => {
                    prop_assert!(set.iter().any(|(g, _)| samples_of(*g).len() < min_samples.max(1) as usize));
                }
                (Verdict::Pass, None) => {
                    for (gate, limit) in &set {
                        let all = samples_of(*gate);
                        prop_assert!(all.len() >= min_samples.max(1) as usize);
                        prop_assert!(all.iter().all(|(_, v)| !gate.breaks(*v, *limit)));
                    }
                }
            }
        }
    }

    #[test]
    fn real_tool_results_separate_q8_0_from_other_weights() {
        let fixture = |name: &str| {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eval/");
            std::fs::read_to_string(format!("{dir}{name}")).expect("fixture")
        };
        let measured_from = |name: &str| {
            let kld = crate::eval::perplexity::parse_kl_divergence(
                &fixture(&format!("{name}.stdout")),
                &fixture(&format!("{name}.stderr")),
            )
            .expect("summary");
            measured(Some(kld), (0, 0))
        };
        // Thresholds that fit the tiny model: its near-uniform outputs keep every KLD small.
        let gates = QualityGates { max_kld: Some(0.001), min_top1_agreement: Some(0.9), ..QualityGates::default() };
        let (q8, other) = (measured_from("kld_q8_0"), measured_from("kld_other_seed"));
        assert_eq!(judge_class(&gates, [("pi-1", &q8)], 1), Verdict::Pass);
        let Verdict::Fail(breach) = judge_class(&gates, [("pi-1", &q8), ("pi-2", &other)], 1) else {
            panic!("B2 is far")
        };
        assert_eq!(
            breach.to_string(),
            "KL divergence 0.0080 > --max-kld 0.001 on device pi-2 (1 of 2 measured devices break it)"
        );
    }
}
