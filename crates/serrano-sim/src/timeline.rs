//! What each simulated backend was doing over a run: its utilization (the share of time a step
//! was in flight), KV cache in use and queue length (requests waiting to be admitted), each
//! averaged over fixed bins of virtual time. A step holds its values from its start to its
//! end; between steps a backend is idle (the engine starts a step whenever anything can run),
//! so idle time counts as zero.

/// Bins a run is cut into at first (the arrivals' span over this many).
pub const TARGET_BINS: usize = 240;
/// Most bins a series holds: a run that outlasts them (a queue draining long after the last
/// arrival) doubles the bin width and merges pairs, so memory stays bounded however long the
/// drain.
pub const MAX_BINS: usize = 4 * TARGET_BINS;
/// The narrowest bin, seconds (a run of a few arrivals still gets readable bins).
const MIN_BIN_S: f64 = 0.01;

/// Sums per bin of one backend's step time, block-seconds of KV and request-seconds waiting.
#[derive(Debug, Clone, Default, PartialEq)]
struct Series {
    busy_s: Vec<f64>,
    kv_block_s: Vec<f64>,
    waiting_s: Vec<f64>,
}

impl Series {
    fn add(&mut self, bin: usize, seconds: f64, kv_blocks: usize, waiting: usize) {
        if self.busy_s.len() <= bin {
            self.busy_s.resize(bin + 1, 0.0);
            self.kv_block_s.resize(bin + 1, 0.0);
            self.waiting_s.resize(bin + 1, 0.0);
        }
        self.busy_s[bin] += seconds;
        self.kv_block_s[bin] += seconds * kv_blocks as f64;
        self.waiting_s[bin] += seconds * waiting as f64;
    }

    /// Pairs of bins merged into one (the bin width doubled).
    fn halve(&mut self) {
        for v in [&mut self.busy_s, &mut self.kv_block_s, &mut self.waiting_s] {
            *v = v.chunks(2).map(|c| c.iter().sum()).collect();
        }
    }
}

/// The backends' series over one run, on one virtual clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    bin_s: f64,
    /// The latest step end recorded: the run's end.
    end_s: f64,
    /// Each backend's KV cache, blocks.
    kv_blocks: Vec<usize>,
    series: Vec<Series>,
}

/// One backend's averages per bin.
#[derive(Debug, Clone, PartialEq)]
pub struct Averages {
    /// Share of the bin a step was in flight, 0..1.
    pub utilization: Vec<f64>,
    /// Share of the KV cache's blocks held by sequences, 0..1.
    pub kv_usage: Vec<f64>,
    /// Requests waiting for admission.
    pub queue: Vec<f64>,
}

impl Timeline {
    /// A timeline for backends with these KV sizes (blocks), binned to fit arrivals over
    /// `span_s` seconds.
    pub fn new(kv_blocks: Vec<usize>, span_s: f64) -> Timeline {
        let bin_s = (span_s / TARGET_BINS as f64).max(MIN_BIN_S);
        Timeline {
            bin_s,
            end_s: 0.0,
            series: vec![Series::default(); kv_blocks.len()],
            kv_blocks,
        }
    }

    /// Backend `k` ran a step from `start` to `end` holding `kv_blocks` blocks with `waiting`
    /// requests not yet admitted.
    pub fn step(&mut self, k: usize, start: f64, end: f64, kv_blocks: usize, waiting: usize) {
        let (start, end) = (start.max(0.0), end.max(start.max(0.0)));
        if !end.is_finite() {
            return;
        }
        while end / self.bin_s >= MAX_BINS as f64 {
            self.bin_s *= 2.0;
            self.series.iter_mut().for_each(Series::halve);
        }
        self.end_s = self.end_s.max(end);
        // Walk the bins by index (a float edge computed from `t` may round to `t` itself and
        // never advance): each iteration moves to the next bin, so the walk ends.
        let (mut t, mut bin) = (start, (start / self.bin_s) as usize);
        while t < end {
            let edge = ((bin + 1) as f64 * self.bin_s).min(end);
            if edge > t {
                self.series[k].add(bin, edge - t, kv_blocks, waiting);
                t = edge;
            }
            bin += 1;
        }
    }

    /// Seconds per bin.
    pub fn bin_s(&self) -> f64 {
        self.bin_s
    }

    /// How many bins the run covers.
    pub fn bins(&self) -> usize {
        (self.end_s / self.bin_s).ceil() as usize
    }

    /// Backend `k`'s averages per bin (the last bin over the part of it the run lasted).
    pub fn averages(&self, k: usize) -> Averages {
        let s = &self.series[k];
        let n = self.bins();
        let width = |b: usize| (self.end_s - b as f64 * self.bin_s).clamp(0.0, self.bin_s);
        let per = |v: &[f64], scale: f64| -> Vec<f64> {
            (0..n)
                .map(|b| {
                    let w = width(b);
                    let x = v.get(b).copied().unwrap_or(0.0);
                    if w > 0.0 {
                        x / (w * scale)
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        Averages {
            utilization: per(&s.busy_s, 1.0),
            kv_usage: per(&s.kv_block_s, self.kv_blocks[k].max(1) as f64),
            queue: per(&s.waiting_s, 1.0),
        }
    }

    /// How many backends.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Backend `k` over the whole run: the share of time busy, the highest bin's KV usage, and
    /// the highest bin's queue.
    pub fn overall(&self, k: usize) -> (f64, f64, f64) {
        let s = &self.series[k];
        let busy = if self.end_s > 0.0 {
            s.busy_s.iter().sum::<f64>() / self.end_s
        } else {
            0.0
        };
        let a = self.averages(k);
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        (busy, max(&a.kv_usage), max(&a.queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_across_bins_is_split_by_the_time_in_each() {
        // 120 s of arrivals in 240 bins: 0.5 s each.
        let mut t = Timeline::new(vec![100], 120.0);
        assert!((t.bin_s() - 0.5).abs() < 1e-12);
        // Busy from 0.25 to 1.0 with 50 blocks and 2 waiting; then idle to 1.5 (a last step).
        t.step(0, 0.25, 1.0, 50, 2);
        t.step(0, 1.4, 1.5, 0, 0);
        let a = t.averages(0);
        assert_eq!(t.bins(), 3);
        assert!((a.utilization[0] - 0.5).abs() < 1e-9, "{a:?}");
        assert!((a.utilization[1] - 1.0).abs() < 1e-9, "{a:?}");
        assert!((a.utilization[2] - 0.2).abs() < 1e-9, "{a:?}");
        assert!((a.kv_usage[0] - 0.25).abs() < 1e-9, "{a:?}");
        assert!((a.kv_usage[1] - 0.5).abs() < 1e-9, "{a:?}");
        assert!((a.queue[1] - 2.0).abs() < 1e-9, "{a:?}");
        let (busy, kv, queue) = t.overall(0);
        assert!((busy - 0.85 / 1.5).abs() < 1e-9);
        assert!((kv - 0.5).abs() < 1e-9 && (queue - 2.0).abs() < 1e-9);
    }

    /// Steps that start and end on bin edges computed in floating point (where `t / bin_s`
    /// and `bin * bin_s` disagree in the last bit) are split exactly, and the walk ends.
    #[test]
    fn steps_on_float_bin_edges_keep_their_time() {
        let mut t = Timeline::new(vec![8], 2.4);
        let bin = t.bin_s();
        let mut total = 0.0;
        for i in 0..200 {
            let (start, end) = (i as f64 * bin, (i as f64 + 0.999) * bin);
            t.step(0, start, end, 1, 0);
            t.step(0, i as f64 * 0.3, i as f64 * 0.3 + 1e-12, 1, 0);
            total += end - start + 1e-12;
        }
        let (busy, _, _) = t.overall(0);
        let end = 199.0 * 0.3 + 1e-12;
        assert!((busy * end - total).abs() < 1e-9, "{} {total}", busy * end);
    }

    /// A run that outlasts its bins widens them and keeps every second it recorded.
    #[test]
    fn a_long_drain_widens_the_bins_and_keeps_the_totals() {
        let mut t = Timeline::new(vec![10, 10], 24.0);
        let mut s = 0.0;
        while s < 500.0 {
            // 70% busy: a 70 ms step every 100 ms.
            t.step(1, s, s + 0.07, 5, 1);
            s += 0.1;
        }
        assert!(t.bins() <= MAX_BINS);
        assert!(t.bin_s() > 0.1);
        let a = t.averages(1);
        let full = &a.utilization[..a.utilization.len() - 1];
        assert!(full.iter().all(|u| (u - 0.7).abs() < 1e-6), "{full:?}");
        assert!(a.kv_usage.iter().all(|&u| u <= 0.5 + 1e-9));
        assert!((t.overall(1).0 - 0.7).abs() < 1e-3);
        assert!(t.averages(0).utilization.iter().all(|&u| u == 0.0));
    }
}
