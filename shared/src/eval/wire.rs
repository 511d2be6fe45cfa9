//! The quality result on the wire: [`QualityResult`] to its protobuf mirror and back, field for field, so a
//! device's report reaches the controller's gates unchanged.

use super::checks::CheckFailure;
use super::perplexity::{Estimate, KlDivergence, PerplexitySettings};
use super::quality::{CouldNotRun, EvalSettings, GoldenSummary, Measurement, Outcome, QualityGates, QualityResult};
use crate::digest::Digest;
use crate::proto;

/// A protobuf quality result that cannot be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("quality result: {field} is not a digest: {value:?}")]
    Digest { field: &'static str, value: String },
    #[error("quality result: it says neither what was measured nor why it could not run")]
    NoOutcome,
    #[error("quality result: a measurement without {0}")]
    Missing(&'static str),
    #[error("quality result: unknown could-not-run kind {0:?}")]
    UnknownKind(String),
}

/// The report's form of a device's result.
pub fn to_proto(result: &QualityResult) -> proto::QualityResult {
    let outcome = match &result.outcome {
        Outcome::Measured(m) => proto::quality_result::Outcome::Measured(measurement_to_proto(m)),
        Outcome::CouldNotRun(c) => proto::quality_result::Outcome::CouldNotRun(could_not_run_to_proto(c)),
    };
    proto::QualityResult {
        suite_digest: result.suite.to_string(),
        variant_digest: result.candidate.to_string(),
        baseline_variant_digest: result.baseline.as_ref().map(ToString::to_string).unwrap_or_default(),
        outcome: Some(outcome),
    }
}

/// A reported result read back, refusing what does not parse.
pub fn from_proto(result: &proto::QualityResult) -> Result<QualityResult, WireError> {
    let outcome = match result.outcome.as_ref().ok_or(WireError::NoOutcome)? {
        proto::quality_result::Outcome::Measured(m) => Outcome::Measured(measurement_from_proto(m)?),
        proto::quality_result::Outcome::CouldNotRun(c) => Outcome::CouldNotRun(could_not_run_from_proto(c)?),
    };
    let baseline = match result.baseline_variant_digest.as_str() {
        "" => None,
        value => Some(digest("baseline_variant_digest", value)?),
    };
    Ok(QualityResult {
        suite: digest("suite_digest", &result.suite_digest)?,
        candidate: digest("variant_digest", &result.variant_digest)?,
        baseline,
        outcome,
    })
}

/// A rollout's quality gates on the wire, as the gate math takes them.
pub fn rollout_gates(g: &proto::RolloutGates) -> QualityGates {
    QualityGates {
        max_kld: g.max_kld,
        min_top1_agreement: g.min_top1_agreement,
        max_perplexity_ratio: g.max_perplexity_ratio,
        min_golden_pass: g.min_golden_pass,
    }
}

/// A quality floor on the wire (recommendations, the recommended-variant policy), as gates.
pub fn floor_gates(f: &proto::QualityFloor) -> QualityGates {
    QualityGates {
        max_kld: f.max_kld,
        min_top1_agreement: f.min_top1_agreement,
        max_perplexity_ratio: f.max_perplexity_ratio,
        min_golden_pass: f.min_golden_pass,
    }
}

fn digest(field: &'static str, value: &str) -> Result<Digest, WireError> {
    value.parse().map_err(|_| WireError::Digest { field, value: value.to_owned() })
}

fn estimate(e: &Estimate) -> proto::Estimate {
    proto::Estimate { value: e.value, uncertainty: e.uncertainty }
}

fn estimate_back(e: Option<&proto::Estimate>, field: &'static str) -> Result<Estimate, WireError> {
    e.map(|e| Estimate { value: e.value, uncertainty: e.uncertainty }).ok_or(WireError::Missing(field))
}

fn measurement_to_proto(m: &Measurement) -> proto::QualityMeasurement {
    let p = &m.settings.perplexity;
    proto::QualityMeasurement {
        perplexity: m.perplexity.as_ref().map(estimate),
        kl_divergence: m.kl_divergence.as_ref().map(|k| proto::KlDivergence {
            ppl: Some(estimate(&k.ppl)),
            base_ppl: Some(estimate(&k.base_ppl)),
            ppl_ratio: Some(estimate(&k.ppl_ratio)),
            kld_mean: Some(estimate(&k.kld_mean)),
            kld_median: k.kld_median,
            kld_p99: k.kld_p99,
            kld_max: k.kld_max,
            top1_agreement: Some(estimate(&k.top1_agreement)),
        }),
        golden_prompts: m.golden.prompts,
        golden_passed: m.golden.passed,
        golden_failures: m
            .golden
            .failures
            .iter()
            .map(|f| proto::GoldenFailure {
                prompt_id: f.prompt.clone(),
                check: f.check,
                label: f.label.clone(),
                reason: f.reason.clone(),
            })
            .collect(),
        build: m.build.clone(),
        settings: Some(proto::EvalSettings {
            context_size: p.context_size,
            chunks: p.chunks,
            threads: p.threads,
            gpu_layers: p.gpu_layers,
            seed: m.settings.seed,
        }),
        duration_ms: m.duration_ms,
    }
}

fn measurement_from_proto(m: &proto::QualityMeasurement) -> Result<Measurement, WireError> {
    let kl_divergence = match &m.kl_divergence {
        None => None,
        Some(k) => Some(KlDivergence {
            ppl: estimate_back(k.ppl.as_ref(), "kl_divergence.ppl")?,
            base_ppl: estimate_back(k.base_ppl.as_ref(), "kl_divergence.base_ppl")?,
            ppl_ratio: estimate_back(k.ppl_ratio.as_ref(), "kl_divergence.ppl_ratio")?,
            kld_mean: estimate_back(k.kld_mean.as_ref(), "kl_divergence.kld_mean")?,
            kld_median: k.kld_median,
            kld_p99: k.kld_p99,
            kld_max: k.kld_max,
            top1_agreement: estimate_back(k.top1_agreement.as_ref(), "kl_divergence.top1_agreement")?,
        }),
    };
    let s = m.settings.as_ref().ok_or(WireError::Missing("settings"))?;
    let failures = m
        .golden_failures
        .iter()
        .map(|f| CheckFailure {
            prompt: f.prompt_id.clone(),
            check: f.check,
            label: f.label.clone(),
            reason: f.reason.clone(),
        })
        .collect();
    Ok(Measurement {
        perplexity: m.perplexity.as_ref().map(|e| Estimate { value: e.value, uncertainty: e.uncertainty }),
        kl_divergence,
        golden: GoldenSummary { prompts: m.golden_prompts, passed: m.golden_passed.min(m.golden_prompts), failures },
        build: m.build.clone(),
        settings: EvalSettings {
            perplexity: PerplexitySettings {
                context_size: s.context_size,
                chunks: s.chunks,
                threads: s.threads,
                gpu_layers: s.gpu_layers,
            },
            seed: s.seed,
        },
        duration_ms: m.duration_ms,
    })
}

fn could_not_run_to_proto(c: &CouldNotRun) -> proto::CouldNotRun {
    let mut out = proto::CouldNotRun::default();
    out.kind = match c {
        CouldNotRun::DoesNotFit { needed_bytes, available_bytes } => {
            (out.needed_bytes, out.available_bytes) = (*needed_bytes, *available_bytes);
            "does_not_fit"
        }
        CouldNotRun::SuiteTooLargeForBudget { estimated_seconds, budget_seconds } => {
            (out.estimated_seconds, out.budget_seconds) = (*estimated_seconds, *budget_seconds);
            "suite_too_large_for_budget"
        }
        CouldNotRun::OutOfTime { budget_seconds } => {
            out.budget_seconds = *budget_seconds;
            "out_of_time"
        }
        CouldNotRun::ToolMissing { tool } => {
            out.tool = tool.clone();
            "tool_missing"
        }
        CouldNotRun::Failed { problem } => {
            out.problem = problem.clone();
            "failed"
        }
    }
    .to_owned();
    out
}

fn could_not_run_from_proto(c: &proto::CouldNotRun) -> Result<CouldNotRun, WireError> {
    Ok(match c.kind.as_str() {
        "does_not_fit" => CouldNotRun::DoesNotFit { needed_bytes: c.needed_bytes, available_bytes: c.available_bytes },
        "suite_too_large_for_budget" => CouldNotRun::SuiteTooLargeForBudget {
            estimated_seconds: c.estimated_seconds,
            budget_seconds: c.budget_seconds,
        },
        "out_of_time" => CouldNotRun::OutOfTime { budget_seconds: c.budget_seconds },
        "tool_missing" => CouldNotRun::ToolMissing { tool: c.tool.clone() },
        "failed" => CouldNotRun::Failed { problem: c.problem.clone() },
        other => return Err(WireError::UnknownKind(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> QualityResult {
        let e = |value: f64| Estimate { value, uncertainty: value / 100.0 };
        QualityResult {
            suite: Digest::of(b"suite"),
            candidate: Digest::of(b"b"),
            baseline: Some(Digest::of(b"a")),
            outcome: Outcome::Measured(Measurement {
                perplexity: Some(e(12.5)),
                kl_divergence: Some(KlDivergence {
                    ppl: e(12.5),
                    base_ppl: e(12.0),
                    ppl_ratio: e(1.04),
                    kld_mean: e(0.02),
                    kld_median: 0.01,
                    kld_p99: 0.2,
                    kld_max: 1.5,
                    top1_agreement: e(0.93),
                }),
                golden: GoldenSummary::new(
                    3,
                    vec![CheckFailure {
                        prompt: "capital".into(),
                        check: 2,
                        label: "contains \"Paris\"".into(),
                        reason: "not in the reply".into(),
                    }],
                ),
                build: "b6000".into(),
                settings: EvalSettings {
                    perplexity: PerplexitySettings { context_size: 128, chunks: 16, threads: 2, gpu_layers: 0 },
                    seed: 42,
                },
                duration_ms: 1234,
            }),
        }
    }

    #[test]
    fn a_measurement_survives_the_wire_unchanged() {
        let result = measured();
        assert_eq!(from_proto(&to_proto(&result)), Ok(result));
    }

    #[test]
    fn every_could_not_run_kind_survives_the_wire_unchanged() {
        for reason in [
            CouldNotRun::DoesNotFit { needed_bytes: 5, available_bytes: 3 },
            CouldNotRun::SuiteTooLargeForBudget { estimated_seconds: 900, budget_seconds: 600 },
            CouldNotRun::OutOfTime { budget_seconds: 60 },
            CouldNotRun::ToolMissing { tool: "llama-perplexity".into() },
            CouldNotRun::Failed { problem: "exit 1".into() },
        ] {
            let result = QualityResult { baseline: None, outcome: Outcome::CouldNotRun(reason), ..measured() };
            assert_eq!(from_proto(&to_proto(&result)), Ok(result));
        }
    }

    #[test]
    fn garbage_numbers_stay_garbage() {
        let mut result = measured();
        if let Outcome::Measured(m) = &mut result.outcome {
            m.perplexity = Some(Estimate { value: f64::NAN, uncertainty: f64::INFINITY });
        }
        let back = from_proto(&to_proto(&result)).expect("reads back");
        let Outcome::Measured(m) = back.outcome else { panic!("measured") };
        assert!(m.perplexity.is_some_and(|p| p.value.is_nan() && p.uncertainty.is_infinite()));
    }

    #[test]
    fn a_malformed_report_is_refused_with_the_field() {
        let mut wire = to_proto(&measured());
        wire.variant_digest = "sha256:nope".into();
        assert!(matches!(from_proto(&wire), Err(WireError::Digest { field: "variant_digest", .. })));
        let mut wire = to_proto(&measured());
        wire.outcome = None;
        assert_eq!(from_proto(&wire), Err(WireError::NoOutcome));
        let wire = proto::QualityResult {
            outcome: Some(proto::quality_result::Outcome::CouldNotRun(proto::CouldNotRun {
                kind: "bored".into(),
                ..Default::default()
            })),
            ..to_proto(&measured())
        };
        assert_eq!(from_proto(&wire), Err(WireError::UnknownKind("bored".into())));
    }
}
