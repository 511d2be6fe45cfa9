//! Per hardware class, the fastest variant of a bundle within a quality preference, from calibration
//! benchmarks. Pure: `alkictl bench recommend`, the Recommend RPC and the rollout's
//! "recommended per class" variant policy all call [`recommend`].

use std::collections::{BTreeMap, HashMap};

use alki_shared::proto;
use alki_shared::quantization::quantization_rank;

use super::stats::stat;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecommendError {
    #[error("unknown quantization {0:?}; give a llama.cpp name such as Q4_K_M, Q5_K_M, Q8_0 or F16")]
    UnknownQuantization(String),
}

/// Recommends a variant per class from benchmark results of `bundle_digest` (calibration and any other
/// trigger: every successful result of a variant on a device counts once, its newest). A device's value
/// is its median generation tokens/s; a variant's is the median over devices of the class.
pub fn recommend(
    bundle_digest: &str,
    results: &[proto::BenchmarkResult],
    min_quantization: &str,
) -> Result<Vec<proto::ClassRecommendation>, RecommendError> {
    let floor = if min_quantization.trim().is_empty() {
        None
    } else {
        Some(
            quantization_rank(min_quantization)
                .ok_or_else(|| RecommendError::UnknownQuantization(min_quantization.to_owned()))?,
        )
    };
    // class → variant → device → (at, tps, ttft, name)
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
    let mut out = Vec::new();
    for (class, variants) in by_class {
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
        let median = |s: &proto::VariantScore| s.generation_tokens_per_second.map(|s| s.median).unwrap_or(0.0);
        scores.sort_by(|a, b| median(b).total_cmp(&median(a)).then_with(|| a.variant_digest.cmp(&b.variant_digest)));
        let acceptable = |s: &proto::VariantScore| match floor {
            None => true,
            Some(floor) => quantization_rank(&s.variant_name).is_some_and(|rank| rank >= floor),
        };
        let mut rec = proto::ClassRecommendation { class, ..Default::default() };
        match scores.iter().find(|s| acceptable(s)) {
            Some(best) => {
                rec.variant_digest = best.variant_digest.clone();
                rec.variant_name = best.variant_name.clone();
                rec.generation_tokens_per_second = median(best);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let recs = recommend("sha256:bb", &results, "").expect("recommend");
        let picks: Vec<(&str, &str)> = recs.iter().map(|r| (r.class.as_str(), r.variant_name.as_str())).collect();
        assert_eq!(picks, [("pi5-8g", "Q4_K_M"), ("x86-avx2", "Q8_0")]);
        assert_eq!(recs[0].generation_tokens_per_second, 7.0, "median over devices");
        assert_eq!(recs[0].variants[0].devices, 2);

        let recs = recommend("sha256:bb", &results, "Q5_K_M").expect("recommend");
        assert_eq!(recs[0].variant_name, "Q8_0", "Q4 is below the floor");
        let recs = recommend("sha256:bb", &results, "F16").expect("recommend");
        assert!(recs[0].variant_digest.is_empty() && recs[0].reason.contains("no calibrated variant"));
        assert!(recommend("sha256:other", &results, "").expect("recommend").is_empty());
        assert_eq!(
            recommend("sha256:bb", &results, "Q9000x"),
            Err(RecommendError::UnknownQuantization("Q9000x".into()))
        );
    }
}
