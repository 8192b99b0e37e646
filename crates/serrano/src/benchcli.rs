//! `serrano bench`: drive an OpenAI-compatible endpoint with a workload and report latency,
//! throughput, goodput and cost (see `serrano-bench`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serrano_bench::report::{self, Price};
use serrano_bench::sweep::Sweep;
use serrano_bench::{Arrival, Endpoint, Length, RunOptions, RunResult, Slo, Target, Workload};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  serrano bench --concurrency 8 --requests 64                    # closed loop against 127.0.0.1:8080\n  serrano bench --rate 4 --arrival poisson --requests 200 --slo ttft_p99=2s,tpot_p99=100ms\n  serrano bench --workload chat.toml --vs http://127.0.0.1:8081/v1 --rounds 2 --json out.json"
)]
pub struct BenchArgs {
    /// The endpoint's base URL, including /v1.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    url: String,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, default_value = "SERRANO_API_KEY")]
    api_key_env: String,
    /// A server with the same model to make exact-length prompts with (its /tokenize and
    /// /detokenize), for an endpoint without those routes, e.g. `serrano gateway` in front of
    /// serrano or vLLM nodes: give one node's URL. Without it (and without the routes) prompt
    /// lengths are approximate, one word per token.
    #[arg(long)]
    tokenizer_url: Option<String>,
    /// A second endpoint, run with the same workload, interleaved; ratios are printed.
    #[arg(long)]
    vs: Option<String>,
    /// Environment variable holding the second endpoint's key (default: the first's).
    #[arg(long)]
    vs_api_key_env: Option<String>,
    /// Runs per endpoint, alternating A B A B (with --vs); results merge per endpoint. Each
    /// round draws new prompts (seed + round), so no server answers a repeat from its cache.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// A workload file (TOML, or JSON by extension); replaces the workload options below.
    #[arg(long, conflicts_with_all = ["concurrency", "rate", "prompt_tokens", "output_tokens"])]
    workload: Option<PathBuf>,
    /// Replay a trace: JSON lines of {"time": seconds, "tenant": name, "prompt_tokens": N,
    /// "output_tokens": M} (tenants as declared in --workload); arrivals follow the trace.
    #[arg(long, conflicts_with_all = ["concurrency", "rate", "sweep"])]
    trace: Option<PathBuf>,
    /// chat or completions.
    #[arg(long, default_value = "chat", value_parser = parse_endpoint)]
    endpoint: Endpoint,
    /// Default: the first model the endpoint lists.
    #[arg(long)]
    model: Option<String>,
    /// Closed loop: this many clients, each sending when its last request ends.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<u32>,
    /// Open loop: requests per second, sent on schedule whatever the server does.
    #[arg(long)]
    rate: Option<f64>,
    /// Open-loop arrivals: constant, poisson or gamma.
    #[arg(long, default_value = "poisson")]
    arrival: String,
    /// Coefficient of variation of gamma gaps (1 = Poisson; higher is burstier).
    #[arg(long, default_value_t = 2.0)]
    cv: f64,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: u64,
    #[arg(long, default_value_t = 128)]
    output_tokens: u64,
    /// Tokens every prompt shares at its start (a system prompt).
    #[arg(long, default_value_t = 0)]
    shared_prefix: u64,
    /// Measured requests.
    #[arg(long, default_value_t = 100)]
    requests: u64,
    /// Stop sending after this many seconds, whatever the count.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests sent first and left out of every number.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Ask for non-streamed responses (TTFT is then the whole response).
    #[arg(long)]
    no_stream: bool,
    /// Let generation stop at EOS (default: ignore_eos, so output lengths are what was asked).
    #[arg(long)]
    allow_eos: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Service-level objective for goodput, e.g. ttft_p99=500ms,tpot_p99=50ms (metrics: ttft,
    /// tpot, itl, e2el).
    #[arg(long, value_parser = Slo::parse)]
    slo: Option<Slo>,
    /// The endpoint's price per hour (instance cost), for dollars per 1M output tokens.
    #[arg(long)]
    price_per_hour: Option<f64>,
    /// Per-token prices (a hosted API), dollars per 1M input and output tokens.
    #[arg(long)]
    price_per_1m_input: Option<f64>,
    #[arg(long)]
    price_per_1m_output: Option<f64>,
    /// Find the highest rate (or concurrency) that meets --slo and the workload tenants' own
    /// SLOs: double from --rate (or --concurrency) until it fails, then bisect; every point is
    /// reported.
    #[arg(long)]
    sweep: bool,
    /// Bisection steps after the doubling.
    #[arg(long, default_value_t = 3)]
    sweep_steps: u32,
    /// Write the results as JSON (vLLM's --save-result field names where they match).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (latency CDFs; with --sweep, throughput and TTFT
    /// against load).
    #[arg(long)]
    html: Option<PathBuf>,
    /// Requests per conversation (chat): each turn resends the earlier turns with the server's
    /// replies, then a new message of --prompt-tokens, so later turns share a growing prefix.
    #[arg(long, default_value_t = 1)]
    turns: u32,
    /// Seconds between a reply and the conversation's next turn.
    #[arg(long, default_value_t = 0.0)]
    think_time: f64,
    /// Write the measured prompts as JSON lines of {"text", "output_length"} (aiperf's
    /// single_turn dataset format), to replay the same workload with another tool.
    #[arg(long)]
    save_prompts: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    match s {
        "chat" => Ok(Endpoint::Chat),
        "completions" => Ok(Endpoint::Completions),
        _ => Err(format!("'{s}': chat or completions")),
    }
}

fn workload(a: &BenchArgs) -> Result<Workload> {
    if let Some(path) = &a.workload {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json = path.extension().is_some_and(|e| e == "json");
        return Workload::parse(&text, json)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    let arrival = match (a.concurrency, a.rate) {
        (_, Some(rate)) => match a.arrival.as_str() {
            "constant" => Arrival::Constant { rate },
            "poisson" => Arrival::Poisson { rate },
            "gamma" => Arrival::Gamma { rate, cv: a.cv },
            other => bail!("--arrival {other}: constant, poisson or gamma"),
        },
        (c, None) => Arrival::Closed {
            concurrency: c.unwrap_or(1),
        },
    };
    let w = Workload {
        name: "command line".into(),
        endpoint: a.endpoint,
        stream: !a.no_stream,
        model: a.model.clone(),
        ignore_eos: !a.allow_eos,
        prompt_tokens: Length::Fixed {
            value: a.prompt_tokens,
        },
        output_tokens: Length::Fixed {
            value: a.output_tokens,
        },
        shared_prefix_tokens: a.shared_prefix,
        arrival,
        requests: a.requests,
        duration_s: a.duration,
        warmup_requests: a.warmup,
        seed: a.seed,
        tenants: vec![],
        turns: a.turns,
        think_time_s: a.think_time,
    };
    w.check().map_err(|e| anyhow::anyhow!(e))?;
    Ok(w)
}

/// Several rounds of one endpoint as one run: each round's timeline is shifted past the last.
fn merge(w: &Workload, mut rounds: Vec<RunResult>, slo: Option<&Slo>) -> Result<Option<RunResult>> {
    if rounds.is_empty() {
        return Ok(None);
    }
    let mut first = rounds.remove(0);
    for r in rounds {
        let offset = first.records.iter().map(|x| x.end).fold(0.0, f64::max);
        first.records.extend(r.records.into_iter().map(|mut x| {
            x.intended += offset;
            x.sent += offset;
            x.end += offset;
            x.chunks.iter_mut().for_each(|c| *c += offset);
            x
        }));
    }
    (first.summary, first.tenants) = serrano_bench::run::judge(w, &first.records, slo)?;
    Ok(Some(first))
}

pub fn run(a: BenchArgs) -> Result<()> {
    let w = workload(&a)?;
    let key = std::env::var(&a.api_key_env).ok();
    let mut targets = vec![Target::new(&a.url, key.clone())?];
    if let Some(vs) = &a.vs {
        let key = match &a.vs_api_key_env {
            Some(var) => Some(std::env::var(var).with_context(|| format!("${var} is not set"))?),
            None => key,
        };
        targets.push(Target::new(vs, key)?);
    }
    if let Some(url) = &a.tokenizer_url {
        targets = targets.into_iter().map(|t| t.tokenize_at(url)).collect();
    }
    let trace = match &a.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                serrano_bench::workload::parse_trace(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let opts = RunOptions {
        trace,
        save_prompts: a.save_prompts.clone(),
        slo: a.slo.clone(),
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let price = (a.price_per_hour.is_some()
        || a.price_per_1m_input.is_some()
        || a.price_per_1m_output.is_some())
    .then_some(Price {
        per_hour: a.price_per_hour,
        per_1m_input: a.price_per_1m_input,
        per_1m_output: a.price_per_1m_output,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut per_target: Vec<Vec<RunResult>> = vec![vec![]; targets.len()];
    let mut sweeps: Vec<Sweep> = Vec::new();
    rt.block_on(async {
        if a.sweep {
            for t in &targets {
                if !a.quiet {
                    eprintln!("sweeping {}", t.base);
                }
                let s = serrano_bench::sweep::sweep(t, &w, &opts, a.sweep_steps).await?;
                print!("{}", sweep_table(&t.base, &s));
                sweeps.push(s);
            }
            // The summary shows each endpoint at its best load (else its lowest).
            for (i, s) in sweeps.iter().enumerate() {
                let curve = s.curve();
                let pick = curve
                    .iter()
                    .find(|(l, _)| Some(*l) == s.best)
                    .or(curve.first())
                    .map(|(_, r)| r.clone());
                per_target[i].extend(pick);
            }
            return anyhow::Ok(());
        }
        for round in 0..a.rounds.max(1) {
            // New prompts each round (the same for every endpoint within it): a repeated prompt
            // would be served from a server's prefix cache in later rounds.
            let w = Workload {
                seed: w.seed.wrapping_add(u64::from(round)),
                ..w.clone()
            };
            for (i, t) in targets.iter().enumerate() {
                if !a.quiet {
                    eprintln!("round {} of {}: {}", round + 1, a.rounds.max(1), t.base);
                }
                let r = serrano_bench::run(t, &w, &opts).await?;
                per_target[i].push(r);
            }
        }
        anyhow::Ok(())
    })?;
    let mut results: Vec<RunResult> = Vec::new();
    for r in per_target {
        results.extend(merge(&w, r, a.slo.as_ref())?);
    }
    let names: Vec<String> = (0..results.len())
        .map(|i| {
            if i == 0 {
                "A".to_string()
            } else {
                "B (--vs)".to_string()
            }
        })
        .collect();
    let cols: Vec<(&str, &RunResult)> = names
        .iter()
        .map(String::as_str)
        .zip(results.iter())
        .collect();
    print!("{}", report::table(&cols, price.as_ref()));
    if results.len() == 2 {
        print!("{}", report::ratios(&results[0], &results[1]));
    }
    for r in &results {
        if r.summary.failed > 0 {
            let first = r
                .records
                .iter()
                .find_map(|x| x.error.clone())
                .unwrap_or_default();
            eprintln!(
                "warning: {}: {} requests failed; first error: {first}",
                r.url, r.summary.failed
            );
        }
        if !r.exact_prompt_lengths {
            eprintln!("warning: {} has no /tokenize route; prompt lengths are approximate (one word per token)", r.url);
        }
    }
    if let Some(path) = &a.html {
        let sw: Vec<(&str, &Sweep)> = names
            .iter()
            .map(String::as_str)
            .zip(sweeps.iter())
            .collect();
        let title = format!("serrano bench: {}", w.name);
        std::fs::write(
            path,
            serrano_bench::html::report(&title, &cols, &sw, price.as_ref(), ""),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.json {
        let v: Vec<serde_json::Value> = results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v = report::to_json(r, price.as_ref());
                if let Some(s) = sweeps.get(i) {
                    let points: Vec<serde_json::Value> = s
                        .curve()
                        .iter()
                        .map(|(l, r)| serde_json::json!({"load": l, "result": report::summary_json(r, price.as_ref())}))
                        .collect();
                    v["sweep"] = serde_json::json!({"load_kind": s.load_kind, "best": s.best, "points": points});
                }
                v
            })
            .collect();
        let v = if v.len() == 1 {
            v.into_iter().next().unwrap_or_default()
        } else {
            serde_json::Value::Array(v)
        };
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// One endpoint's sweep as a terminal table.
fn met(slo_met: Option<bool>) -> &'static str {
    if slo_met == Some(true) {
        "met"
    } else {
        "missed"
    }
}

fn sweep_table(url: &str, s: &Sweep) -> String {
    let mut out = format!("sweep of {url} by {}:\n", s.load_kind);
    out.push_str("      load    req/s  out tok/s  TTFT p50  TTFT p99  TPOT p99  goodput  SLO\n");
    for (load, r) in s.curve() {
        let m = &r.summary;
        out.push_str(&format!(
            "{load:>10.2} {:>8.2} {:>10.1} {:>9.0} {:>9.0} {:>9.1} {:>8.2}  {}\n",
            m.request_throughput,
            m.output_throughput,
            m.ttft.p(50.0).unwrap_or(f64::NAN),
            m.ttft.p(99.0).unwrap_or(f64::NAN),
            m.tpot.p(99.0).unwrap_or(f64::NAN),
            m.request_goodput.unwrap_or(0.0),
            met(m.slo_met)
        ));
        for t in &r.tenants {
            let m = &t.summary;
            out.push_str(&format!(
                "           tenant {}: {} requests, TTFT p99 {:.0}, ITL p99 {:.1}, TPOT p99 {:.1} ms, {}\n",
                t.name,
                m.completed + m.failed,
                m.ttft.p(99.0).unwrap_or(f64::NAN),
                m.itl.p(99.0).unwrap_or(f64::NAN),
                m.tpot.p(99.0).unwrap_or(f64::NAN),
                match (&t.slo, m.slo_met) {
                    (Some(slo), met_) => format!("own SLO {slo} {}", met(met_)),
                    (None, None) => "no SLO".into(),
                    (None, met_) => met(met_).to_string(),
                }
            ));
        }
    }
    out.push_str(&match s.best {
        Some(b) => format!("highest {} meeting the SLO: {b:.2}\n\n", s.load_kind),
        None => "no load met the SLO\n\n".to_string(),
    });
    out
}
