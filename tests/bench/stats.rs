//! Latency samples and their summary (nearest-rank percentiles, in ms).

use serde::{Deserialize, Serialize};

/// Summary of one set of latency samples, all in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Summarises `samples` (milliseconds, any order). Empty input gives zeros.
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        Self {
            count: s.len(),
            p50_ms: percentile(&s, 50.0),
            p90_ms: percentile(&s, 90.0),
            p99_ms: percentile(&s, 99.0),
            max_ms: *s.last().unwrap_or(&0.0),
            mean_ms: mean,
        }
    }
}

/// Nearest-rank percentile of an ascending slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(Summary::of(&[3.0]).p99_ms, 3.0);
        assert_eq!(Summary::of(&[]).count, 0);
    }
}
