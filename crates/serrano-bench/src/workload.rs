//! What a benchmark sends and when: a workload is a small TOML or JSON file (or the same fields
//! from the command line). Every bound is explicit: request count, duration, lengths.

use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Exp, Gamma, LogNormal, Normal};
use serde::{Deserialize, Serialize};

/// Most requests one run may send (each keeps its timeline in memory).
pub const MAX_REQUESTS: u64 = 1_000_000;
/// Longest prompt or output asked for.
pub const MAX_TOKENS: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    #[default]
    Chat,
    Completions,
}

/// A length: fixed or drawn from a distribution, clamped to `[min, max]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Length {
    Fixed {
        value: u64,
    },
    Uniform {
        min: u64,
        max: u64,
    },
    Normal {
        mean: f64,
        sd: f64,
        #[serde(default = "one")]
        min: u64,
        #[serde(default = "max_tokens")]
        max: u64,
    },
    /// Long-tailed, like real chat traffic; `mean` and `sd` of the length itself.
    Lognormal {
        mean: f64,
        sd: f64,
        #[serde(default = "one")]
        min: u64,
        #[serde(default = "max_tokens")]
        max: u64,
    },
}

fn one() -> u64 {
    1
}
fn max_tokens() -> u64 {
    MAX_TOKENS
}

impl Length {
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let clamp = |v: f64, min: u64, max: u64| (v.round().max(min as f64) as u64).min(max);
        match *self {
            Length::Fixed { value } => value,
            Length::Uniform { min, max } => rng.random_range(min..=max.max(min)),
            Length::Normal { mean, sd, min, max } => {
                // Parameters rand_distr refuses (a non-finite mean) draw the mean itself.
                match Normal::new(mean, sd.max(0.0)) {
                    Ok(d) => clamp(d.sample(rng), min, max),
                    Err(_) => clamp(mean, min, max),
                }
            }
            Length::Lognormal { mean, sd, min, max } => {
                // The underlying normal's parameters for a lognormal with this mean and sd.
                let m = mean.max(1.0);
                let v = sd.max(0.0).powi(2);
                let sigma2 = (1.0 + v / (m * m)).ln();
                let mu = m.ln() - sigma2 / 2.0;
                match LogNormal::new(mu, sigma2.sqrt()) {
                    Ok(d) => clamp(d.sample(rng), min, max),
                    Err(_) => clamp(m, min, max),
                }
            }
        }
    }

    pub fn check(&self, what: &str) -> Result<(), String> {
        let ok = match *self {
            Length::Fixed { value } => (1..=MAX_TOKENS).contains(&value),
            Length::Uniform { min, max } => min >= 1 && min <= max && max <= MAX_TOKENS,
            Length::Normal { mean, sd, min, max } | Length::Lognormal { mean, sd, min, max } => {
                mean.is_finite()
                    && mean > 0.0
                    && sd.is_finite()
                    && sd >= 0.0
                    && min >= 1
                    && min <= max
                    && max <= MAX_TOKENS
            }
        };
        ok.then_some(()).ok_or_else(|| {
            format!("{what}: lengths are 1 to {MAX_TOKENS} tokens, min <= max, mean > 0, sd >= 0")
        })
    }
}

/// When requests are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Arrival {
    /// A fixed number of clients, each sending its next request when the last one ends.
    Closed { concurrency: u32 },
    /// Open loop: requests at fixed intervals, whether or not earlier ones have finished.
    Constant { rate: f64 },
    /// Open loop: exponential gaps (a Poisson process).
    Poisson { rate: f64 },
    /// Open loop: gamma gaps with this coefficient of variation (1 is Poisson; above is burstier).
    Gamma { rate: f64, cv: f64 },
    /// Open loop: the rate rises linearly from `from` to `to` over the run's duration.
    Ramp { from: f64, to: f64 },
}

impl Arrival {
    pub fn is_open(&self) -> bool {
        !matches!(self, Arrival::Closed { .. })
    }

    /// The mean rate, for reports (`inf` for a closed loop, as vLLM writes it).
    pub fn rate(&self) -> f64 {
        match *self {
            Arrival::Closed { .. } => f64::INFINITY,
            Arrival::Constant { rate }
            | Arrival::Poisson { rate }
            | Arrival::Gamma { rate, .. } => rate,
            Arrival::Ramp { from, to } => (from + to) / 2.0,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        let rate_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 1e6;
        let ok = match *self {
            Arrival::Closed { concurrency } => (1..=100_000).contains(&concurrency),
            Arrival::Constant { rate } | Arrival::Poisson { rate } => rate_ok(rate),
            Arrival::Gamma { rate, cv } => {
                rate_ok(rate) && cv.is_finite() && cv > 0.0 && cv <= 100.0
            }
            Arrival::Ramp { from, to } => rate_ok(from) && rate_ok(to),
        };
        ok.then_some(()).ok_or_else(|| {
            "arrival: concurrency 1 to 100000, rates above 0 and at most 1e6/s, cv in (0, 100]"
                .to_string()
        })
    }

    /// Intended send times (offsets from the start) of `n` requests, for an open loop; a ramp
    /// spreads over `duration`.
    pub fn schedule(
        &self,
        n: u64,
        duration: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Vec<Duration> {
        let mut t = 0.0f64;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            out.push(Duration::from_secs_f64(t));
            let gap = match *self {
                Arrival::Closed { .. } => 0.0,
                Arrival::Constant { rate } => 1.0 / rate,
                Arrival::Poisson { rate } => Exp::new(rate).map_or(1.0 / rate, |d| d.sample(rng)),
                Arrival::Gamma { rate, cv } => {
                    let shape = 1.0 / (cv * cv);
                    Gamma::new(shape, 1.0 / (rate * shape)).map_or(1.0 / rate, |d| d.sample(rng))
                }
                Arrival::Ramp { from, to } => {
                    // Rate at this point of the run: by time when a duration bounds it, else by count.
                    let frac = match duration {
                        Some(d) if d.as_secs_f64() > 0.0 => (t / d.as_secs_f64()).min(1.0),
                        _ => i as f64 / n.max(1) as f64,
                    };
                    1.0 / (from + (to - from) * frac)
                }
            };
            t += gap;
        }
        out
    }
}

/// One tenant of a multi-tenant mix: its own key and share of the requests, and optionally
/// its own lengths and SLO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    /// Environment variable holding its API key.
    pub key_env: Option<String>,
    #[serde(default = "one_f")]
    pub weight: f64,
    /// Its prompts' lengths (default: the workload's).
    pub prompt_tokens: Option<Length>,
    /// Its outputs' lengths (default: the workload's).
    pub output_tokens: Option<Length>,
    /// Its own SLO, as `--slo` writes one (`ttft_p99=2s,itl_p99=150ms`): a run meets its SLO
    /// only when every tenant with one meets its own, and the whole run meets `--slo` if given.
    pub slo: Option<String>,
}

impl Tenant {
    /// Its SLO, parsed.
    pub fn parsed_slo(&self) -> Result<Option<crate::metrics::Slo>, String> {
        self.slo
            .as_deref()
            .map(crate::metrics::Slo::parse)
            .transpose()
            .map_err(|e| format!("tenant {}: slo: {e}", self.name))
    }
}

/// The index of an item drawn with probability proportional to its weight (all above 0);
/// `None` for no items. The bench and the simulator draw tenants with it.
pub fn pick_weighted(
    weights: impl Iterator<Item = f64> + Clone,
    rng: &mut impl Rng,
) -> Option<usize> {
    let total: f64 = weights.clone().sum();
    let n = weights.clone().count();
    (n > 0).then(|| {
        let mut x = rng.random_range(0.0..total);
        weights
            .clone()
            .position(|w| {
                x -= w;
                x < 0.0
            })
            .unwrap_or(n - 1)
    })
}

fn one_f() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub endpoint: Endpoint,
    #[serde(default = "yes")]
    pub stream: bool,
    /// Default: the first model the server lists.
    pub model: Option<String>,
    /// Ask for exactly the output length (`ignore_eos`, where the server supports it).
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    pub prompt_tokens: Length,
    pub output_tokens: Length,
    /// Tokens every prompt starts with (a shared system prompt), within `prompt_tokens`.
    #[serde(default)]
    pub shared_prefix_tokens: u64,
    pub arrival: Arrival,
    /// Measured requests (after the warm-up).
    pub requests: u64,
    /// Stop sending after this long, whatever the count.
    pub duration_s: Option<f64>,
    /// Requests sent first and left out of every number.
    #[serde(default)]
    pub warmup_requests: u64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    /// Requests per conversation (chat only). Each turn sends the earlier turns' messages with
    /// the server's actual replies, then a new user message of `prompt_tokens`, so later turns
    /// share a growing prefix (what prefix caching is for). `requests` still counts requests.
    #[serde(default = "one_turn")]
    pub turns: u32,
    /// Seconds between a reply and the conversation's next turn (a user reading and typing).
    #[serde(default)]
    pub think_time_s: f64,
}

/// Most turns in one conversation.
pub const MAX_TURNS: u32 = 100;

fn one_turn() -> u32 {
    1
}
fn default_name() -> String {
    "workload".into()
}
fn yes() -> bool {
    true
}

impl Workload {
    pub fn parse(text: &str, json: bool) -> Result<Workload, String> {
        let w: Workload = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        w.check()?;
        Ok(w)
    }

    pub fn check(&self) -> Result<(), String> {
        self.prompt_tokens.check("prompt_tokens")?;
        self.output_tokens.check("output_tokens")?;
        self.arrival.check()?;
        if !(1..=MAX_REQUESTS).contains(&self.requests) || self.warmup_requests > MAX_REQUESTS {
            return Err(format!("requests: 1 to {MAX_REQUESTS}"));
        }
        if self.duration_s.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
            return Err("duration_s: positive seconds".into());
        }
        if self
            .tenants
            .iter()
            .any(|t| !(t.weight.is_finite() && t.weight > 0.0))
        {
            return Err("tenants: weights above 0".into());
        }
        for t in &self.tenants {
            if let Some(l) = &t.prompt_tokens {
                l.check(&format!("tenant {}: prompt_tokens", t.name))?;
            }
            if let Some(l) = &t.output_tokens {
                l.check(&format!("tenant {}: output_tokens", t.name))?;
            }
            t.parsed_slo()?;
        }
        if !(1..=MAX_TURNS).contains(&self.turns) {
            return Err(format!("turns: 1 to {MAX_TURNS}"));
        }
        if self.turns > 1 && self.endpoint != Endpoint::Chat {
            return Err("turns: conversations need endpoint = \"chat\"".into());
        }
        if !(self.think_time_s.is_finite() && (0.0..=3600.0).contains(&self.think_time_s)) {
            return Err("think_time_s: 0 to 3600 seconds".into());
        }
        Ok(())
    }
}

/// One line of a trace to replay (JSONL): when the request arrives (seconds from the start),
/// whose it is, and its lengths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceEntry {
    pub time: f64,
    pub tenant: Option<String>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

/// Parses a JSONL trace (blank lines skipped); entries are replayed in time order.
pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let e: TraceEntry =
            serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let ok = e.time.is_finite()
            && e.time >= 0.0
            && (1..=MAX_TOKENS).contains(&e.prompt_tokens)
            && (1..=MAX_TOKENS).contains(&e.output_tokens);
        if !ok {
            return Err(format!(
                "line {}: time >= 0 and lengths 1 to {MAX_TOKENS}",
                i + 1
            ));
        }
        out.push(e);
        if out.len() as u64 > MAX_REQUESTS {
            return Err(format!("more than {MAX_REQUESTS} requests"));
        }
    }
    if out.is_empty() {
        return Err("an empty trace".into());
    }
    out.sort_by(|a, b| a.time.total_cmp(&b.time));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn a_workload_file_parses() {
        let w = Workload::parse(
            r#"
endpoint = "completions"
requests = 100
prompt_tokens = { dist = "fixed", value = 128 }
output_tokens = { dist = "lognormal", mean = 200, sd = 100, max = 1024 }
arrival = { kind = "gamma", rate = 4.0, cv = 2.0 }
"#,
            false,
        )
        .unwrap();
        assert_eq!(w.endpoint, Endpoint::Completions);
        assert!(w.stream && w.ignore_eos);
        assert!(Workload::parse("requests = 1", false).is_err());
    }

    #[test]
    fn conversations_are_chat_and_bounded() {
        let base = r#"
requests = 12
prompt_tokens = { dist = "fixed", value = 64 }
output_tokens = { dist = "fixed", value = 16 }
arrival = { kind = "closed", concurrency = 2 }
"#;
        let w = Workload::parse(&format!("{base}turns = 3\nthink_time_s = 0.5\n"), false).unwrap();
        assert_eq!((w.turns, w.think_time_s), (3, 0.5));
        assert_eq!(Workload::parse(base, false).unwrap().turns, 1);
        for bad in [
            "turns = 0\n",
            "turns = 101\n",
            "turns = 2\nendpoint = \"completions\"\n",
            "think_time_s = -1\n",
        ] {
            let e = Workload::parse(&format!("{base}{bad}"), false).unwrap_err();
            assert!(
                e.contains("turns") || e.contains("think_time_s"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_readme_workload_parses() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("```toml\n")
            .find(|b| b.starts_with("name = \"chat, long-tailed"))
            .and_then(|b| b.split("```").next())
            .expect("README has the workload example");
        let w = Workload::parse(block, false).unwrap();
        assert_eq!(w.tenants.len(), 2);
        assert_eq!(w.arrival, Arrival::Gamma { rate: 3.0, cv: 2.0 });
    }

    #[test]
    fn arrival_processes_have_their_rate_and_burstiness() {
        let n = 20_000;
        let gaps = |a: Arrival| {
            let s = a.schedule(n, None, &mut rng());
            let g: Vec<f64> = s.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let sd = (g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
            (mean, sd / mean)
        };
        let (m, cv) = gaps(Arrival::Constant { rate: 10.0 });
        assert!((m - 0.1).abs() < 1e-9 && cv < 1e-6);
        let (m, cv) = gaps(Arrival::Poisson { rate: 10.0 });
        assert!(
            (m - 0.1).abs() < 0.005 && (cv - 1.0).abs() < 0.05,
            "{m} {cv}"
        );
        let (m, cv) = gaps(Arrival::Gamma {
            rate: 10.0,
            cv: 3.0,
        });
        assert!((m - 0.1).abs() < 0.01 && (cv - 3.0).abs() < 0.3, "{m} {cv}");
    }

    #[test]
    fn traces_parse_sorted_and_bounded() {
        let t = parse_trace(
            "{\"time\": 1.5, \"tenant\": \"a\", \"prompt_tokens\": 10, \"output_tokens\": 5}\n\n{\"time\": 0.5, \"prompt_tokens\": 3, \"output_tokens\": 2}\n",
        )
        .unwrap();
        assert_eq!(t.iter().map(|e| e.time).collect::<Vec<_>>(), [0.5, 1.5]);
        assert!(parse_trace("{\"time\": -1, \"prompt_tokens\": 3, \"output_tokens\": 2}").is_err());
        let e = parse_trace("{\"time\": 1}\n").unwrap_err();
        assert!(e.starts_with("line 1"), "{e}");
    }

    #[test]
    fn lengths_stay_in_bounds_and_near_their_mean() {
        let l = Length::Lognormal {
            mean: 200.0,
            sd: 100.0,
            min: 1,
            max: 1000,
        };
        let mut r = rng();
        let v: Vec<u64> = (0..20_000).map(|_| l.sample(&mut r)).collect();
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
        assert!(v.iter().all(|&x| (1..=1000).contains(&x)));
        assert!((mean - 200.0).abs() < 10.0, "{mean}");
        assert!(Length::Uniform { min: 5, max: 3 }.check("x").is_err());
    }
}
