//! Live latency estimates per backend: an exponentially weighted mean and variance of the
//! samples real traffic produces, read as a p95 estimate (mean + 1.645 sd, the normal quantile).
//! An EWMA reacts within a few requests when a backend slows down, which is what routing needs;
//! it is an estimate for decisions, not a reported percentile.

use std::time::{Duration, Instant};

/// Weight of the newest sample.
const ALPHA: f64 = 0.2;
/// The standard normal's 95th percentile.
const Z95: f64 = 1.645;

#[derive(Debug, Clone, Default)]
pub struct Ewma {
    mean: f64,
    var: f64,
    samples: u64,
    last: Option<Instant>,
}

impl Ewma {
    pub fn update(&mut self, now: Instant, x: f64) {
        if !x.is_finite() || x < 0.0 {
            return;
        }
        if self.samples == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let diff = x - self.mean;
            let incr = ALPHA * diff;
            self.mean += incr;
            self.var = (1.0 - ALPHA) * (self.var + diff * incr);
        }
        self.samples += 1;
        self.last = Some(now);
    }

    /// The p95 estimate, or `None` with no sample newer than `stale_after`.
    pub fn p95(&self, now: Instant, stale_after: Duration) -> Option<f64> {
        let last = self.last?;
        (now.saturating_duration_since(last) <= stale_after)
            .then(|| self.mean + Z95 * self.var.max(0.0).sqrt())
    }

    pub fn mean(&self) -> Option<f64> {
        (self.samples > 0).then_some(self.mean)
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_a_shift_within_a_few_samples_and_goes_stale() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        for _ in 0..20 {
            e.update(t0, 10.0);
        }
        assert!((e.p95(t0, Duration::from_secs(1)).unwrap() - 10.0).abs() < 1e-9);
        for _ in 0..8 {
            e.update(t0, 100.0);
        }
        assert!(e.p95(t0, Duration::from_secs(1)).unwrap() > 80.0);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(e.p95(later, Duration::from_secs(1)), None);
    }

    #[test]
    fn spread_raises_the_p95_above_the_mean() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        for i in 0..50 {
            e.update(t0, if i % 2 == 0 { 10.0 } else { 30.0 });
        }
        let p95 = e.p95(t0, Duration::from_secs(1)).unwrap();
        assert!(p95 > e.mean().unwrap() + 10.0, "{p95}");
    }
}
