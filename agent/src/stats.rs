//! Statistics of repeated measurements (pure): the median and the spread, shared by benchmarks (over
//! repetitions of the prompt set) and telemetry (over the time to first token of served requests).

use alki_shared::proto;

/// The median of `samples` (the mean of the middle two for an even count); None when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 })
}

/// Median, range and sample standard deviation (n - 1) of repeated measurements; non-finite ones are ignored.
pub fn stat(samples: &[f64]) -> proto::Stat {
    let finite: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
    let Some(median) = median(&finite) else { return proto::Stat::default() };
    let n = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / n;
    let variance =
        if finite.len() > 1 { finite.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    proto::Stat {
        median,
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        stddev: variance.sqrt(),
        samples: u32::try_from(finite.len()).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let s = stat(&[10.0, 12.0, 14.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.samples), (12.0, 10.0, 14.0, 3));
        assert!((s.stddev - 2.0).abs() < 1e-9, "sample standard deviation: {}", s.stddev);
        assert_eq!(stat(&[7.0]).stddev, 0.0);
        assert_eq!(stat(&[]), proto::Stat::default());
    }
}
