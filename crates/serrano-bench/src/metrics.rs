//! Metric definitions, computed from each request's timeline. Times are seconds from the run's
//! start. The definitions (also in README's Benchmarks section):
//!
//! - **TTFT**: first content token received minus the *intended* send time. In an open loop a
//!   request the client could not send on time still counts from when it should have gone, so
//!   queueing in the client (or a saturated client) shows up instead of being hidden
//!   (no coordinated omission). A non-streamed response's first token is the whole response.
//! - **E2E**: last byte received minus intended send time.
//! - **TPOT** (per request): (E2E - TTFT) / (output tokens - 1), for requests with 2 or more.
//! - **ITL**: every gap between consecutive content chunks, pooled over all requests.
//! - **Throughput**: tokens (or requests) completed over the run's duration, from the first
//!   intended send to the last response.
//! - **Goodput**: the same, counting only successful requests that meet every per-request SLO
//!   threshold (TTFT, TPOT, E2E).
//! - **Client lag**: actual minus intended send time; a large lag means the client itself was
//!   saturated and the offered rate was not what was asked for.

use serde::Serialize;

/// One request's timeline and counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestRecord {
    pub tenant: Option<String>,
    pub intended: f64,
    pub sent: f64,
    /// Arrival times of every chunk carrying content (the first is the first token).
    pub chunks: Vec<f64>,
    pub end: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub error: Option<String>,
    /// Sent a second time after the server closed a kept-alive connection under it.
    pub retried: bool,
    /// Which turn of its conversation (0 for the first, and for single-turn workloads).
    pub turn: u32,
}

/// Mean TTFT (ms) of the successful requests of each turn, first turn first; empty when every
/// request is a first turn (single-turn workloads).
pub fn mean_ttft_ms_by_turn(records: &[RequestRecord]) -> Vec<f64> {
    let turns = records.iter().map(|r| r.turn).max().unwrap_or(0);
    if turns == 0 {
        return vec![];
    }
    (0..=turns)
        .map(|t| {
            let v: Vec<f64> = records
                .iter()
                .filter(|r| r.turn == t)
                .filter_map(RequestRecord::ttft)
                .collect();
            v.iter().sum::<f64>() / v.len() as f64 * 1e3
        })
        .collect()
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn ttft(&self) -> Option<f64> {
        self.chunks.first().map(|t| t - self.intended)
    }

    pub fn e2e(&self) -> f64 {
        self.end - self.intended
    }

    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft()?;
        (self.output_tokens > 1).then(|| (self.e2e() - ttft) / (self.output_tokens - 1) as f64)
    }

    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.chunks.windows(2).map(|w| w[1] - w[0])
    }

    pub fn lag(&self) -> f64 {
        self.sent - self.intended
    }
}

/// Percentiles reported for every latency.
pub const PERCENTILES: [f64; 4] = [50.0, 90.0, 95.0, 99.0];

/// A latency's distribution, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    /// (percentile, value, 95% confidence interval) for each of `PERCENTILES`.
    pub percentiles: Vec<(f64, f64, [f64; 2])>,
}

impl Stats {
    /// From samples in seconds.
    pub fn of(samples_s: &[f64]) -> Stats {
        let mut v: Vec<f64> = samples_s
            .iter()
            .map(|s| s * 1e3)
            .filter(|s| s.is_finite())
            .collect();
        if v.is_empty() {
            return Stats::default();
        }
        // Unstable: a total order leaves equal keys bitwise equal, so the result is the same
        // and pdqsort is about twice as fast on the tens of millions of gaps of a long run.
        v.sort_unstable_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Stats {
            count: v.len(),
            mean,
            median: percentile(&v, 50.0),
            std,
            percentiles: PERCENTILES
                .iter()
                .map(|&p| (p, percentile(&v, p), quantile_ci(&v, p / 100.0)))
                .collect(),
        }
    }

    pub fn p(&self, pct: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(p, _, _)| *p == pct)
            .map(|x| x.1)
    }
}

/// The `pct`-th percentile of sorted samples, interpolating linearly between ranks (numpy's
/// default, which vLLM's reports use).
pub fn percentile(sorted: &[f64], pct: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (pct / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// A distribution-free 95% confidence interval for the `q` quantile: the order statistics whose
/// ranks bound the binomial count of samples below the quantile (normal approximation).
pub fn quantile_ci(sorted: &[f64], q: f64) -> [f64; 2] {
    let n = sorted.len();
    if n == 0 {
        return [f64::NAN, f64::NAN];
    }
    let nf = n as f64;
    let half = 1.96 * (nf * q * (1.0 - q)).sqrt();
    let lo = ((nf * q - half).floor() - 1.0).clamp(0.0, nf - 1.0) as usize;
    let hi = ((nf * q + half).ceil() - 1.0).clamp(0.0, nf - 1.0) as usize;
    [sorted[lo], sorted[hi]]
}

/// A service-level objective: each listed percentile at most its threshold.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slo {
    /// (metric: ttft | tpot | itl | e2el, percentile, threshold in ms).
    pub targets: Vec<(String, f64, f64)>,
}

impl Slo {
    /// Parses `ttft_p99=500ms,tpot_p99=50ms,e2el_p90=2s`.
    pub fn parse(s: &str) -> Result<Slo, String> {
        let mut targets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lhs, rhs) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': write metric_pNN=VALUE, e.g. ttft_p99=500ms"))?;
            let (metric, pct) = lhs
                .split_once("_p")
                .ok_or_else(|| format!("'{lhs}': write metric_pNN, e.g. ttft_p99"))?;
            if !["ttft", "tpot", "itl", "e2el"].contains(&metric) {
                return Err(format!(
                    "'{metric}': the SLO metrics are ttft, tpot, itl and e2el"
                ));
            }
            let pct: f64 = pct
                .parse()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p) && *p > 0.0)
                .ok_or_else(|| format!("'{lhs}': the percentile is 1 to 100"))?;
            let ms =
                parse_ms(rhs).ok_or_else(|| format!("'{rhs}': a duration like 500ms or 2s"))?;
            targets.push((metric.to_string(), pct, ms));
        }
        if targets.is_empty() {
            return Err("an empty SLO".into());
        }
        Ok(Slo { targets })
    }

    /// Whether one request meets every per-request threshold (ITL is judged on the pooled
    /// distribution only).
    pub fn request_ok(&self, r: &RequestRecord) -> bool {
        r.ok()
            && self.targets.iter().all(|(metric, _, ms)| {
                let v = match metric.as_str() {
                    "ttft" => r.ttft(),
                    "tpot" => r.tpot(),
                    "e2el" => Some(r.e2e()),
                    _ => None,
                };
                v.is_none_or(|v| v * 1e3 <= *ms)
            })
    }
}

fn parse_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        (s, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| v * scale)
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub error_rate: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// With an SLO: good requests per second and their output tokens per second.
    pub request_goodput: Option<f64>,
    pub token_goodput: Option<f64>,
    /// With an SLO: whether every target percentile is within its threshold.
    pub slo_met: Option<bool>,
    pub ttft: Stats,
    pub tpot: Stats,
    pub itl: Stats,
    pub e2el: Stats,
    pub client_lag: Stats,
    /// Requests resent once on a fresh connection (the server had closed a kept-alive one).
    pub retried: usize,
}

pub fn summarize(records: &[RequestRecord], slo: Option<&Slo>) -> Summary {
    if records.is_empty() {
        return Summary::default();
    }
    let start = records
        .iter()
        .map(|r| r.intended)
        .fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.end)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration = (end - start).max(1e-9);
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let input: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let output: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft()).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itls()).collect();
    let e2els: Vec<f64> = ok.iter().map(|r| r.e2e()).collect();
    let lags: Vec<f64> = records.iter().map(|r| r.lag()).collect();
    let mut s = Summary {
        duration,
        completed: ok.len(),
        failed: records.len() - ok.len(),
        error_rate: (records.len() - ok.len()) as f64 / records.len() as f64,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output as f64 / duration,
        total_token_throughput: (input + output) as f64 / duration,
        ttft: Stats::of(&ttfts),
        tpot: Stats::of(&tpots),
        itl: Stats::of(&itls),
        e2el: Stats::of(&e2els),
        client_lag: Stats::of(&lags),
        retried: records.iter().filter(|r| r.retried).count(),
        ..Default::default()
    };
    if let Some(slo) = slo {
        let good: Vec<&RequestRecord> = records.iter().filter(|r| slo.request_ok(r)).collect();
        s.request_goodput = Some(good.len() as f64 / duration);
        s.token_goodput = Some(good.iter().map(|r| r.output_tokens).sum::<u64>() as f64 / duration);
        s.slo_met = Some(
            s.error_rate == 0.0
                && slo.targets.iter().all(|(metric, pct, ms)| {
                    let stats = match metric.as_str() {
                        "ttft" => &s.ttft,
                        "tpot" => &s.tpot,
                        "itl" => &s.itl,
                        _ => &s.e2el,
                    };
                    let mut v: Vec<f64> = match metric.as_str() {
                        "ttft" => ttfts.clone(),
                        "tpot" => tpots.clone(),
                        "itl" => itls.clone(),
                        _ => e2els.clone(),
                    };
                    v.sort_by(f64::total_cmp);
                    let value = stats.p(*pct).unwrap_or_else(|| percentile(&v, *pct) * 1e3);
                    value <= *ms
                }),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streamed request intended at `at`, sent `lag` later, with chunks at the given times.
    fn streamed(at: f64, lag: f64, chunks: &[f64], tokens: u64) -> RequestRecord {
        RequestRecord {
            intended: at,
            sent: at + lag,
            chunks: chunks.to_vec(),
            end: *chunks.last().unwrap(),
            prompt_tokens: 10,
            output_tokens: tokens,
            ..Default::default()
        }
    }

    #[test]
    fn ttft_by_turn() {
        let at = |turn: u32, at: f64, first: f64| RequestRecord {
            turn,
            ..streamed(at, 0.0, &[first, first + 0.1], 2)
        };
        assert!(mean_ttft_ms_by_turn(&[at(0, 0.0, 0.5)]).is_empty());
        let by_turn = mean_ttft_ms_by_turn(&[
            at(0, 0.0, 0.5),
            at(1, 1.0, 1.1),
            at(0, 0.0, 0.7),
            at(1, 2.0, 2.3),
        ]);
        assert_eq!(by_turn.len(), 2);
        assert!((by_turn[0] - 600.0).abs() < 1e-9 && (by_turn[1] - 200.0).abs() < 1e-9);
    }

    #[test]
    fn per_request_definitions() {
        // Intended at 1.0, sent at 1.5 (client lag), first token at 2.0, then every 0.1 s.
        let r = streamed(1.0, 0.5, &[2.0, 2.1, 2.2, 2.3, 2.4], 5);
        assert!(
            (r.ttft().unwrap() - 1.0).abs() < 1e-12,
            "TTFT counts from the intended time"
        );
        assert!((r.e2e() - 1.4).abs() < 1e-12);
        assert!((r.tpot().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(r.itls().count(), 4);
        assert!((r.lag() - 0.5).abs() < 1e-12);
        let one = streamed(0.0, 0.0, &[0.3], 1);
        assert_eq!(one.tpot(), None, "TPOT needs two tokens");
    }

    #[test]
    fn run_totals_and_pooled_itl() {
        let records = vec![
            streamed(0.0, 0.0, &[0.5, 0.6, 0.7], 3),
            streamed(1.0, 0.0, &[1.2, 1.5], 2),
            RequestRecord {
                intended: 2.0,
                sent: 2.0,
                end: 2.1,
                error: Some("500".into()),
                ..Default::default()
            },
        ];
        let s = summarize(&records, None);
        assert!((s.duration - 2.1).abs() < 1e-12);
        assert_eq!((s.completed, s.failed, s.total_output_tokens), (2, 1, 5));
        assert!((s.output_throughput - 5.0 / 2.1).abs() < 1e-9);
        assert!((s.error_rate - 1.0 / 3.0).abs() < 1e-12);
        // ITLs pooled: 100, 100 and 300 ms.
        assert_eq!(s.itl.count, 3);
        assert!((s.itl.mean - 500.0 / 3.0).abs() < 1e-9);
        assert!((s.ttft.mean - 350.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert!((percentile(&v, 50.0) - 5.5).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 9.91).abs() < 1e-12);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn confidence_intervals_bracket_the_estimate_and_narrow_with_samples() {
        let small: Vec<f64> = (0..100).map(f64::from).collect();
        let big: Vec<f64> = (0..10_000).map(|i| f64::from(i) / 100.0).collect();
        let [lo, hi] = quantile_ci(&small, 0.5);
        assert!(lo <= percentile(&small, 50.0) && percentile(&small, 50.0) <= hi);
        assert!(
            (hi - lo) > 8.0,
            "about +-1 sd of a binomial(100, 0.5): +-10 ranks"
        );
        let [lo2, hi2] = quantile_ci(&big, 0.5);
        assert!((hi2 - lo2) < (hi - lo) / 5.0);
        let [lo, hi] = quantile_ci(&small, 0.99);
        assert!(lo >= 95.0 && hi == 99.0, "{lo} {hi}");
    }

    #[test]
    fn goodput_counts_only_requests_within_every_threshold() {
        let slo = Slo::parse("ttft_p99=500ms, tpot_p99=0.1s").unwrap();
        assert_eq!(slo.targets[1], ("tpot".into(), 99.0, 100.0));
        let records = vec![
            streamed(0.0, 0.0, &[0.4, 0.45, 0.5], 3), // good
            streamed(0.0, 0.0, &[0.6, 0.65], 2),      // TTFT 600 ms: bad
            streamed(0.0, 0.0, &[0.1, 0.5], 2),       // TPOT 400 ms: bad
        ];
        let s = summarize(&records, Some(&slo));
        assert!((s.request_goodput.unwrap() - 1.0 / 0.65).abs() < 1e-9);
        assert!((s.token_goodput.unwrap() - 3.0 / 0.65).abs() < 1e-9);
        assert_eq!(s.slo_met, Some(false));
        let loose = Slo::parse("ttft_p50=500ms").unwrap();
        assert_eq!(summarize(&records, Some(&loose)).slo_met, Some(true));
        assert!(Slo::parse("ttft=5ms").is_err() && Slo::parse("speed_p99=1s").is_err());
    }
}
