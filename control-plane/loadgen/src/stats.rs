//! Percentiles and formatting for the result table.

use std::time::Duration;

/// Nearest-rank percentile (`p` in 0..=100) of `samples`; `None` when empty.
///
/// Nearest-rank, not interpolated: every figure reported is a latency some stream
/// actually saw, and p100 is the max.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// p50 / p99 / max of `samples`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        Summary {
            p50: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
            max: percentile(samples, 100.0),
        }
    }
}

/// Milliseconds with one decimal, or `—`.
pub fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}", d.as_secs_f64() * 1000.0),
        None => "—".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).rev().map(d).collect();
        assert_eq!(percentile(&s, 50.0), Some(d(50)));
        assert_eq!(percentile(&s, 99.0), Some(d(99)));
        assert_eq!(percentile(&s, 100.0), Some(d(100)));
        assert_eq!(percentile(&s, 0.0), Some(d(1)));
        assert_eq!(percentile(&[], 50.0), None);
        // Small samples: p99 of 10 values is the max, p50 the 5th.
        let s: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(percentile(&s, 99.0), Some(d(10)));
        assert_eq!(percentile(&s, 50.0), Some(d(5)));
        let one = Summary::of(&[d(7)]);
        assert_eq!(
            (one.p50, one.p99, one.max),
            (Some(d(7)), Some(d(7)), Some(d(7)))
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(ms(Some(Duration::from_micros(1260))), "1.3");
        assert_eq!(ms(None), "—");
    }
}
