//! Order statistics over a handful of samples.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Summary<T = Duration> {
    pub n: usize,
    pub median: T,
    pub p95: T,
    pub max: T,
}

/// Median (mean of the middle two for even n), p95 by nearest rank (the 19th of 20),
/// max. `None` for no samples.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    let mut s = samples.to_vec();
    s.sort();
    of_sorted(&s, |a, b| (a + b) / 2)
}

/// [`summarize`] over plain numbers (ordered by [`f64::total_cmp`]).
pub fn summarize_f64(samples: &[f64]) -> Option<Summary<f64>> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    of_sorted(&s, |a, b| (a + b) / 2.0)
}

/// The statistics of [`summarize`] over samples already sorted; `mean` of two samples
/// gives the median of an even number.
fn of_sorted<T: Copy>(s: &[T], mean: impl Fn(T, T) -> T) -> Option<Summary<T>> {
    let n = s.len();
    if n == 0 {
        return None;
    }
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        mean(s[n / 2 - 1], s[n / 2])
    };
    let rank = (n * 95).div_ceil(100).max(1);
    Some(Summary {
        n,
        median,
        p95: s[rank - 1],
        max: s[n - 1],
    })
}

/// `7.42 ms` below a second, `1.31 s` above.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1000.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn p95_of_twenty_samples_is_the_nineteenth_smallest() {
        let s = summarize(&ms(&(1..=20).rev().collect::<Vec<_>>())).unwrap();
        assert_eq!(s.p95, Duration::from_millis(19));
        assert_eq!(s.max, Duration::from_millis(20));
        assert_eq!(s.median, Duration::from_micros(10_500));
    }

    #[test]
    fn numbers_summarize_as_durations_do() {
        let xs: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = summarize_f64(&xs).unwrap();
        assert_eq!((s.n, s.median, s.p95, s.max), (20, 10.5, 19.0, 20.0));
        assert!(summarize_f64(&[]).is_none());
    }

    #[test]
    fn one_sample_is_its_own_median_p95_and_max() {
        let s = summarize(&ms(&[7])).unwrap();
        assert_eq!((s.median, s.p95, s.max), (s.max, s.max, s.max));
        assert!(summarize(&[]).is_none());
    }
}
