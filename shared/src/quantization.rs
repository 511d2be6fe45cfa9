//! The quality order of llama.cpp quantization names, which the controller's recommendations and alkictl's
//! rollout flags (`--variant-min-quantization`) both rank by.

/// Quality rank of a llama.cpp quantization name: higher keeps more of the model. Q2 < Q3 < Q4 < Q5 < Q6 <
/// Q8 < F16 = BF16 < F32; within a bit width `_0` < `_1` < `K_S` < `K` = `K_M` < `K_L`. `IQ` types rank with
/// their bit width. None for names it does not know.
pub fn quantization_rank(name: &str) -> Option<u32> {
    let upper = name.trim().to_ascii_uppercase();
    match upper.as_str() {
        "F32" => return Some(3200),
        "F16" | "BF16" => return Some(1600),
        _ => {}
    }
    let rest = upper.strip_prefix("IQ").or_else(|| upper.strip_prefix('Q'))?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let bits: u32 = digits.parse().ok()?;
    let suffix = &rest[digits.len()..];
    let sub = match suffix {
        "" | "_0" => 0,
        "_1" => 1,
        "_K_S" | "_XS" | "_XXS" | "_S" => 2,
        "_K" | "_K_M" | "_M" | "_NL" => 3,
        "_K_L" | "_L" => 4,
        _ => return None,
    };
    Some(bits * 100 + sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizations_rank_by_quality() {
        let names = ["Q2_K", "Q3_K_S", "Q4_0", "Q4_K_M", "IQ4_NL", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32"];
        let ranks: Vec<u32> = names.iter().map(|n| quantization_rank(n).expect(n)).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "{ranks:?}");
        assert_eq!(quantization_rank("bf16"), quantization_rank("F16"));
        assert_eq!(quantization_rank("nonsense"), None);
    }
}
