//! How alkictl takes and shows quality: the quality-floor flags (`--max-kld`, `--min-top1-agreement`,
//! `--max-perplexity-ratio`, `--min-golden-pass`) checked before anything is sent, and a class's quality
//! values (worst across its devices) and thresholds as table cells and text.

use alki_shared::eval::quality::{Gate, QualityGates};
use alki_shared::proto;
use anyhow::bail;
use clap::Args;
use serde::Deserialize;

/// A quality floor as measured numbers against a baseline; unset flags are off. Spec files use the same
/// names (`max_kld = 0.05`).
#[derive(Args, Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityArgs {
    /// Highest mean KL divergence from the baseline, e.g. 0.05.
    #[arg(long)]
    pub max_kld: Option<f64>,
    /// Lowest top-1 token agreement with the baseline, 0..1, e.g. 0.9.
    #[arg(long)]
    pub min_top1_agreement: Option<f64>,
    /// Highest perplexity ratio PPL(B)/PPL(A), e.g. 1.05.
    #[arg(long)]
    pub max_perplexity_ratio: Option<f64>,
    /// Lowest fraction of golden prompts passed, 0..1 (1: every prompt).
    #[arg(long)]
    pub min_golden_pass: Option<f64>,
}

impl QualityArgs {
    pub fn gates(&self) -> QualityGates {
        QualityGates {
            max_kld: self.max_kld,
            min_top1_agreement: self.min_top1_agreement,
            max_perplexity_ratio: self.max_perplexity_ratio,
            min_golden_pass: self.min_golden_pass,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.gates().is_empty()
    }

    /// The wire's floor; None when no flag is set.
    pub fn floor(&self) -> Option<proto::QualityFloor> {
        (!self.is_empty()).then_some(proto::QualityFloor {
            max_kld: self.max_kld,
            min_top1_agreement: self.min_top1_agreement,
            max_perplexity_ratio: self.max_perplexity_ratio,
            min_golden_pass: self.min_golden_pass,
        })
    }

    /// Checks every threshold is in range, naming the flag as given (`--variant-max-kld` with the prefix
    /// `variant-`).
    pub fn validate(&self, prefix: &str) -> anyhow::Result<()> {
        if let Err(e) = self.gates().validate() {
            let flag = e.flag.replacen("--", &format!("--{prefix}"), 1);
            bail!("{flag}: {}; {}", e.problem, e.fix);
        }
        Ok(())
    }

    /// The first flag set, as given (for "needs --eval-suite" errors).
    pub fn first_flag(&self, prefix: &str) -> Option<String> {
        let gates = self.gates();
        Gate::ALL.iter().find(|g| g.limit(&gates).is_some()).map(|g| g.flag().replacen("--", &format!("--{prefix}"), 1))
    }
}

/// A quality threshold set on a rollout or a recommendation, as people read it (`KLD <= 0.001`).
pub fn thresholds_text(floor: &QualityGates) -> Vec<String> {
    Gate::ALL
        .iter()
        .filter_map(|g| {
            let limit = g.limit(floor)?;
            let op = if g.is_ceiling() { "<=" } else { ">=" };
            Some(format!("{} {op} {limit}", short_metric(*g)))
        })
        .collect()
}

fn short_metric(gate: Gate) -> &'static str {
    match gate {
        Gate::Kld => "KLD",
        Gate::Top1Agreement => "top-1",
        Gate::PerplexityRatio => "PPL ratio",
        Gate::GoldenPass => "golden pass",
    }
}

pub use alki_shared::eval::wire::{floor_gates, rollout_gates};

/// The column names of [`cells`].
pub const COLUMNS: [&str; 4] = ["KLD", "TOP-1", "PPL RATIO", "GOLDEN"];

/// A class's worst quality values as table cells: KLD, top-1, PPL ratio, golden pass rate; `-` when not
/// measured.
pub fn cells(q: Option<&proto::ClassQuality>) -> [String; 4] {
    let q = q.cloned().unwrap_or_default();
    [kld(q.max_kld), percent(q.min_top1_agreement), ratio(q.max_perplexity_ratio), percent(q.min_golden_pass)]
}

/// `measured 2, could not run 1`, or `-` without any result.
pub fn counts(q: Option<&proto::ClassQuality>) -> String {
    match q {
        Some(q) if q.measured + q.could_not_run > 0 => {
            let mut text = format!("{} measured", q.measured);
            if q.could_not_run > 0 {
                text.push_str(&format!(", {} could not run", q.could_not_run));
            }
            text
        }
        _ => "-".into(),
    }
}

/// A KL divergence: small numbers matter, so six decimals.
pub fn kld(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.6}")).unwrap_or_else(|| "-".into())
}

/// A 0..1 fraction as a percentage.
pub fn percent(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

/// B's and A's error rates at the front port; `-` for both while neither is known (the controller sends 0).
pub fn error_rates(b: f64, a: f64) -> [String; 2] {
    if b == 0.0 && a == 0.0 { ["-".into(), "-".into()] } else { [percent(Some(b)), percent(Some(a))] }
}

pub fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked_and_named_as_given() {
        let args = QualityArgs { max_kld: Some(0.05), min_golden_pass: Some(1.0), ..Default::default() };
        args.validate("").expect("in range");
        assert_eq!(args.floor().and_then(|f| f.max_kld), Some(0.05));
        assert_eq!(args.first_flag("variant-").as_deref(), Some("--variant-max-kld"));
        assert_eq!(thresholds_text(&args.gates()), ["KLD <= 0.05", "golden pass >= 1"]);
        assert_eq!(QualityArgs::default().floor(), None);

        let bad = QualityArgs { min_top1_agreement: Some(90.0), ..Default::default() };
        let err = bad.validate("variant-").expect_err("out of range").to_string();
        assert!(err.starts_with("--variant-min-top1-agreement: 90 is out of range; give a fraction"), "{err}");
    }

    #[test]
    fn cells_show_what_was_measured() {
        let q = proto::ClassQuality {
            measured: 2,
            could_not_run: 1,
            max_kld: Some(0.0079),
            min_top1_agreement: Some(0.0),
            max_perplexity_ratio: None,
            min_golden_pass: Some(0.5),
        };
        assert_eq!(cells(Some(&q)), ["0.007900", "0.0%", "-", "50.0%"]);
        assert_eq!(counts(Some(&q)), "2 measured, 1 could not run");
        assert_eq!(cells(None), ["-", "-", "-", "-"]);
        assert_eq!(counts(None), "-");
    }
}
