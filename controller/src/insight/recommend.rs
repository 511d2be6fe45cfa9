//! Per hardware class, the fastest variant of a bundle within a quality preference, from calibration
//! benchmarks. Pure: `alkictl bench recommend`, the Recommend RPC and the rollout's
//! "recommended per class" variant policy all call [`recommend`].
//!
//! The preference is either a quantization name (`min_quantization`) or, replacing it, a [`QualityFloor`]
//! of measured numbers: per class, a variant is acceptable only when the evaluations of it on the class's
//! devices (each against the bundle's most precise variant on the same device, as calibration with a suite
//! reports them) pass `judge_class` with one sample at least. The variant those evaluations were measured
//! against is the reference and is acceptable as such; a variant without evaluations is not recommended,
//! and the class's reason says which gate each faster variant broke or that it was not evaluated.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use alki_shared::eval::quality::{GateError, Outcome, QualityGates, Verdict, judge_class};
use alki_shared::proto;
use alki_shared::quantization::quantization_rank;

use super::quality::{self, Evaluations};
use super::stats::stat;
use crate::store::EvalSample;

/// A quality floor as measured numbers, and the bundle's evaluations with the suite it is measured with.
pub struct QualityFloor<'a> {
    pub gates: QualityGates,
    pub evaluations: &'a Evaluations,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecommendError {
    #[error("unknown quantization {0:?}; give a llama.cpp name such as Q4_K_M, Q5_K_M, Q8_0 or F16")]
    UnknownQuantization(String),
    #[error("quality floor {0}")]
    Floor(#[from] GateError),
}

/// Whether a variant is within the floor in one class.
enum Within {
    Yes,
    /// It is the variant the others were measured against.
    Reference,
    No(String),
}

/// Judges `variant` of `class` against the floor; with the summary of its evaluations, if it has any.
fn within(
    floor: &QualityFloor<'_>,
    bundle_digest: &str,
    class: &str,
    variant: &str,
) -> (Within, Option<proto::ClassQuality>) {
    let groups = floor.evaluations.by_class_and_variant();
    fn of_bundle<'e>(g: &[&'e EvalSample], bundle_digest: &str) -> Vec<&'e EvalSample> {
        g.iter().copied().filter(|s| s.baseline_bundle == bundle_digest).collect()
    }
    let samples =
        groups.get(&(class.to_owned(), variant.to_owned())).map(|g| of_bundle(g, bundle_digest)).unwrap_or_default();
    if samples.is_empty() {
        let reference: BTreeSet<&str> = groups
            .iter()
            .filter(|((c, _), _)| c == class)
            .flat_map(|(_, g)| of_bundle(g, bundle_digest))
            .map(|s| s.baseline_variant.as_str())
            .collect();
        let verdict = if reference.contains(variant) { Within::Reference } else { Within::No("not evaluated".into()) };
        return (verdict, None);
    }
    let results: Vec<(&str, &Outcome)> = samples.iter().map(|s| (s.device_id.as_str(), &s.outcome)).collect();
    let summary = quality::summarize(results.iter().map(|(_, o)| *o));
    let verdict = match judge_class(&floor.gates, results.iter().copied(), 1) {
        Verdict::Pass => Within::Yes,
        Verdict::Fail(breach) => Within::No(breach.to_string()),
        Verdict::Inconclusive { why } => Within::No(why),
    };
    (verdict, Some(summary))
}

/// Recommends a variant per class from benchmark results of `bundle_digest` (calibration and any other
/// trigger: every successful result of a variant on a device counts once, its newest). A device's value
/// is its median generation tokens/s; a variant's is the median over devices of the class.
pub fn recommend(
    bundle_digest: &str,
    results: &[proto::BenchmarkResult],
    min_quantization: &str,
    quality_floor: Option<&QualityFloor<'_>>,
) -> Result<Vec<proto::ClassRecommendation>, RecommendError> {
    if let Some(q) = quality_floor {
        q.gates.validate()?;
        return Ok(by_class(bundle_digest, results)
            .into_iter()
            .map(|(c, s)| pick_within(bundle_digest, c, s, q))
            .collect());
    }
    let floor = if min_quantization.trim().is_empty() {
        None
    } else {
        Some(
            quantization_rank(min_quantization)
                .ok_or_else(|| RecommendError::UnknownQuantization(min_quantization.to_owned()))?,
        )
    };
    let mut out = Vec::new();
    for (class, scores) in by_class(bundle_digest, results) {
        let acceptable = |s: &proto::VariantScore| match floor {
            None => true,
            Some(floor) => quantization_rank(&s.variant_name).is_some_and(|rank| rank >= floor),
        };
        let mut rec = proto::ClassRecommendation { class, ..Default::default() };
        match scores.iter().find(|s| acceptable(s)) {
            Some(best) => {
                rec.variant_digest = best.variant_digest.clone();
                rec.variant_name = best.variant_name.clone();
                rec.generation_tokens_per_second = speed(best);
                rec.reason = format!(
                    "fastest of {} calibrated variants{} on {} devices",
                    scores.len(),
                    if floor.is_some() { format!(" at or above {min_quantization}") } else { String::new() },
                    best.devices
                );
            }
            None => {
                rec.reason = format!("no calibrated variant is at or above {min_quantization}");
            }
        }
        rec.variants = scores;
        out.push(rec);
    }
    Ok(out)
}

/// A variant's median generation tokens/s over the class's devices.
fn speed(s: &proto::VariantScore) -> f64 {
    s.generation_tokens_per_second.map(|s| s.median).unwrap_or(0.0)
}

/// Every calibrated variant of the bundle per class, fastest first: each device's newest successful result
/// counts once; a variant's speed is the median over the class's devices.
fn by_class(bundle_digest: &str, results: &[proto::BenchmarkResult]) -> BTreeMap<String, Vec<proto::VariantScore>> {
    // class → variant → (name, device → (at, tps, ttft))
    type PerDevice = HashMap<String, (i64, f64, f64)>;
    let mut by_class: BTreeMap<String, BTreeMap<String, (String, PerDevice)>> = BTreeMap::new();
    for r in results {
        let Some(tps) = r.generation_tokens_per_second.filter(|s| s.samples > 0 && s.median > 0.0) else { continue };
        if !r.error.is_empty() || r.bundle.as_ref().map(|b| b.digest.as_str()) != Some(bundle_digest) {
            continue;
        }
        let ttft = r.ttft_ms.map(|s| s.median).unwrap_or(0.0);
        let variant = by_class
            .entry(r.hardware_class.clone())
            .or_default()
            .entry(r.variant_digest.clone())
            .or_insert_with(|| (r.variant_name.clone(), HashMap::new()));
        let slot = variant.1.entry(r.device_id.clone()).or_insert((i64::MIN, 0.0, 0.0));
        if r.at_unix_ms >= slot.0 {
            *slot = (r.at_unix_ms, tps.median, ttft);
        }
    }
    by_class
        .into_iter()
        .map(|(class, variants)| {
            let mut scores: Vec<proto::VariantScore> = variants
                .into_iter()
                .map(|(digest, (name, devices))| {
                    let tps: Vec<f64> = devices.values().map(|v| v.1).collect();
                    let ttft: Vec<f64> = devices.values().map(|v| v.2).filter(|v| *v > 0.0).collect();
                    proto::VariantScore {
                        variant_digest: digest,
                        variant_name: name,
                        generation_tokens_per_second: Some(stat(&tps)),
                        ttft_ms: Some(stat(&ttft)),
                        devices: devices.len() as u32,
                        quality: None,
                    }
                })
                .collect();
            scores.sort_by(|a, b| speed(b).total_cmp(&speed(a)).then_with(|| a.variant_digest.cmp(&b.variant_digest)));
            (class, scores)
        })
        .collect()
}

/// The fastest variant of one class within the quality floor, every variant carrying its quality.
fn pick_within(
    bundle_digest: &str,
    class: String,
    mut scores: Vec<proto::VariantScore>,
    floor: &QualityFloor<'_>,
) -> proto::ClassRecommendation {
    let mut rec = proto::ClassRecommendation { class, ..Default::default() };
    let mut refused = Vec::new();
    let mut best: Option<(usize, bool)> = None;
    for (i, score) in scores.iter_mut().enumerate() {
        let (verdict, summary) = within(floor, bundle_digest, &rec.class, &score.variant_digest);
        score.quality = summary;
        match verdict {
            Within::Yes => best = best.or(Some((i, false))),
            Within::Reference => best = best.or(Some((i, true))),
            Within::No(why) if best.is_none() => {
                let name = if score.variant_name.is_empty() { &score.variant_digest } else { &score.variant_name };
                refused.push(format!("{name}: {why}"));
            }
            Within::No(_) => {}
        }
    }
    match best {
        Some((i, reference)) => {
            let chosen = &scores[i];
            rec.variant_digest = chosen.variant_digest.clone();
            rec.variant_name = chosen.variant_name.clone();
            rec.generation_tokens_per_second = speed(chosen);
            let within = if reference {
                "the reference the others were evaluated against".to_owned()
            } else {
                chosen.quality.as_ref().map(|q| quality::describe(q, &floor.gates)).unwrap_or_default()
            };
            let faster = if refused.is_empty() {
                String::new()
            } else {
                format!("; faster but outside: {}", refused.join("; "))
            };
            rec.reason = format!(
                "fastest of {} calibrated variants within the quality floor ({within}) on {} devices{faster}",
                scores.len(),
                chosen.devices
            );
        }
        None => {
            rec.reason = format!("no calibrated variant stays within the quality floor: {}", refused.join("; "));
        }
    }
    rec.variants = scores;
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insight::quality::tests::measured;

    fn result(device: &str, class: &str, variant: &str, tps: f64) -> proto::BenchmarkResult {
        proto::BenchmarkResult {
            device_id: device.into(),
            hardware_class: class.into(),
            bundle: Some(proto::BundleRef { digest: "sha256:bb".into(), ..Default::default() }),
            variant_digest: format!("sha256:{variant}"),
            variant_name: variant.into(),
            trigger: proto::BenchmarkTrigger::Calibration as i32,
            generation_tokens_per_second: Some(proto::Stat { median: tps, samples: 3, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_fastest_variant_per_class_within_the_quality_floor() {
        let results = vec![
            result("p1", "pi5-8g", "Q4_K_M", 6.0),
            result("p2", "pi5-8g", "Q4_K_M", 8.0),
            result("p1", "pi5-8g", "Q8_0", 3.0),
            result("x1", "x86-avx2", "Q4_K_M", 30.0),
            result("x1", "x86-avx2", "Q8_0", 31.0),
        ];
        let recs = recommend("sha256:bb", &results, "", None).expect("recommend");
        let picks: Vec<(&str, &str)> = recs.iter().map(|r| (r.class.as_str(), r.variant_name.as_str())).collect();
        assert_eq!(picks, [("pi5-8g", "Q4_K_M"), ("x86-avx2", "Q8_0")]);
        assert_eq!(recs[0].generation_tokens_per_second, 7.0, "median over devices");
        assert_eq!(recs[0].variants[0].devices, 2);

        let recs = recommend("sha256:bb", &results, "Q5_K_M", None).expect("recommend");
        assert_eq!(recs[0].variant_name, "Q8_0", "Q4 is below the floor");
        let recs = recommend("sha256:bb", &results, "F16", None).expect("recommend");
        assert!(recs[0].variant_digest.is_empty() && recs[0].reason.contains("no calibrated variant"));
        assert!(recommend("sha256:other", &results, "", None).expect("recommend").is_empty());
        assert_eq!(
            recommend("sha256:bb", &results, "Q9000x", None),
            Err(RecommendError::UnknownQuantization("Q9000x".into()))
        );
    }

    fn evaluated(device: &str, class: &str, variant: &str, kld: f64) -> EvalSample {
        EvalSample {
            device_id: device.into(),
            class: class.into(),
            variant_digest: format!("sha256:{variant}"),
            baseline_bundle: "sha256:bb".into(),
            baseline_variant: "sha256:F16".into(),
            rollout_id: String::new(),
            received_unix_ms: 1,
            outcome: measured(kld, 1.0 - kld, (0, 0)),
        }
    }

    #[test]
    fn under_a_measured_floor_the_fastest_variant_that_stays_within_it_wins() {
        let results = vec![
            result("p1", "pi5-8g", "Q4_K_M", 9.0),
            result("p1", "pi5-8g", "Q8_0", 5.0),
            result("p1", "pi5-8g", "F16", 2.0),
            result("x1", "x86-avx2", "Q4_K_M", 30.0),
            result("x1", "x86-avx2", "Q8_0", 20.0),
        ];
        let evaluations = Evaluations::from_samples(vec![
            evaluated("p1", "pi5-8g", "Q4_K_M", 0.2),
            evaluated("p1", "pi5-8g", "Q8_0", 0.01),
            evaluated("x1", "x86-avx2", "Q4_K_M", 0.02),
        ]);
        let floor = |max_kld| QualityFloor {
            gates: QualityGates { max_kld: Some(max_kld), ..Default::default() },
            evaluations: &evaluations,
        };
        let recs = recommend("sha256:bb", &results, "Q2_K", Some(&floor(0.05))).expect("recommend");
        let picks: Vec<(&str, &str)> = recs.iter().map(|r| (r.class.as_str(), r.variant_name.as_str())).collect();
        assert_eq!(picks, [("pi5-8g", "Q8_0"), ("x86-avx2", "Q4_K_M")], "the floor replaces min_quantization");
        assert!(
            recs[0].reason.contains("Q4_K_M: KL divergence 0.2000 > --max-kld 0.05 on device p1"),
            "{}",
            recs[0].reason
        );
        assert_eq!(recs[0].variants[0].quality.and_then(|q| q.max_kld), Some(0.2), "every variant shows its quality");

        // A looser floor lets the smaller variant in; a tighter one leaves only the reference on pi and
        // nothing on x86, where Q8_0 was never evaluated.
        let recs = recommend("sha256:bb", &results, "", Some(&floor(0.5))).expect("recommend");
        assert_eq!(recs[0].variant_name, "Q4_K_M");
        let recs = recommend("sha256:bb", &results, "", Some(&floor(0.001))).expect("recommend");
        assert_eq!(recs[0].variant_name, "F16", "{}", recs[0].reason);
        assert!(recs[0].reason.contains("the reference"), "{}", recs[0].reason);
        assert!(recs[1].variant_digest.is_empty());
        assert!(recs[1].reason.contains("Q8_0: not evaluated"), "{}", recs[1].reason);
        let bad = QualityFloor {
            gates: QualityGates { max_kld: Some(-1.0), ..Default::default() },
            evaluations: &evaluations,
        };
        assert!(matches!(recommend("sha256:bb", &results, "", Some(&bad)), Err(RecommendError::Floor(_))));
    }
}
