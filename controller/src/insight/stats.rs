//! Medians and spreads of measurements across devices: the one summary every comparison uses.

use alki_shared::proto;

/// Median, min, max and population standard deviation of the finite values; all zero when there are none.
pub fn stat(values: &[f64]) -> proto::Stat {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return proto::Stat::default();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    let mean = v.iter().sum::<f64>() / n as f64;
    let variance = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    proto::Stat { median, min: v[0], max: v[n - 1], stddev: variance.sqrt(), samples: n as u32 }
}

/// The median alone, or None without values.
pub fn median(values: &[f64]) -> Option<f64> {
    let s = stat(values);
    (s.samples > 0).then_some(s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_odd_even_and_empty_sets() {
        let s = stat(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.samples), (2.0, 1.0, 3.0, 3));
        assert!((s.stddev - (2.0f64 / 3.0).sqrt()).abs() < 1e-9);
        assert_eq!(stat(&[4.0, 1.0, 2.0, 10.0]).median, 3.0);
        assert_eq!(stat(&[f64::NAN]).samples, 0);
        assert_eq!(median(&[]), None);
    }
}
