//! Running a workload against one endpoint: warm-up, then the measured requests in a closed or
//! open loop, bounded in count and time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::{self, Prompt, PromptMaker, Target};
use crate::energy::EnergyMeter;
use crate::metrics::{summarize, RequestRecord, Slo, Summary};
use crate::workload::{Arrival, Endpoint, Workload};
use crate::BenchError;

/// Most requests in flight in an open loop; past it the dispatcher waits, and the wait shows
/// as client lag (the offered rate was not achieved) rather than as memory growth.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// One prepared conversation: its turns go one after another, each after the last one's reply
/// (a single turn unless the workload has `turns`).
#[derive(Clone)]
struct Job {
    turns: Vec<Turn>,
    tenant: Option<usize>,
}

/// One request: the new user message (or prompt) and its output length.
#[derive(Clone)]
struct Turn {
    prompt: Prompt,
    max_tokens: u64,
}

/// A tenant's name and key, resolved from the environment.
#[derive(Clone)]
struct TenantKey {
    name: String,
    key: Option<String>,
    weight: f64,
}

/// One tenant's share of a run, measured on its own requests.
#[derive(Debug, Clone, Serialize)]
pub struct TenantResult {
    pub name: String,
    /// Its own SLO, which `summary` was judged by (else the run's).
    pub slo: Option<String>,
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub url: String,
    pub model: String,
    pub workload: String,
    /// The offered rate (requests/s; `inf` for a closed loop) and concurrency, as vLLM reports.
    pub request_rate: f64,
    pub max_concurrency: Option<u32>,
    pub burstiness: Option<f64>,
    /// Whether prompt lengths are exact (the server tokenized the prompts).
    pub exact_prompt_lengths: bool,
    pub summary: Summary,
    /// Per tenant, when the workload has tenants.
    pub tenants: Vec<TenantResult>,
    pub energy: Option<crate::energy::Energy>,
    pub gpu_energy: Option<crate::energy::Energy>,
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

/// Options beyond the workload.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub slo: Option<Slo>,
    pub progress: bool,
    /// Replay these arrivals and lengths instead of the workload's (open loop).
    pub trace: Option<Vec<crate::workload::TraceEntry>>,
    /// Write the measured requests' prompts here before sending them, as JSON lines of
    /// `{"text", "output_length"}` (aiperf's single_turn format), so that another tool can
    /// replay exactly this workload.
    pub save_prompts: Option<std::path::PathBuf>,
}

pub async fn run(
    target: &Target,
    w: &Workload,
    opts: &RunOptions,
) -> Result<RunResult, BenchError> {
    w.check().map_err(BenchError::Workload)?;
    let model = match &w.model {
        Some(m) => m.clone(),
        None => target.first_model().await?,
    };
    let maker = PromptMaker::new(target, &model).await;
    let tenants: Vec<TenantKey> = w
        .tenants
        .iter()
        .map(|t| {
            let key = match &t.key_env {
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    BenchError::Workload(format!("tenant {}: ${var} is not set", t.name))
                })?),
                None => None,
            };
            Ok(TenantKey {
                name: t.name.clone(),
                key,
                weight: t.weight,
            })
        })
        .collect::<Result<_, BenchError>>()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(w.seed);
    let mut jobs = Vec::new();
    let shared = w.shared_prefix_tokens;
    let warmup_jobs = match &opts.trace {
        // A trace fixes every request's lengths and tenant; warm-up requests are drawn.
        Some(trace) => {
            if w.turns > 1 {
                return Err(BenchError::Workload(
                    "a trace replays single requests: turns must be 1".into(),
                ));
            }
            for _ in 0..w.warmup_requests {
                let (p, o) = (
                    w.prompt_tokens.sample(&mut rng),
                    w.output_tokens.sample(&mut rng),
                );
                let turn = make_turn(target, w, &model, &maker, (p, o, shared), &mut rng).await?;
                jobs.push(Job {
                    turns: vec![turn],
                    tenant: None,
                });
            }
            for e in trace {
                let tenant = match &e.tenant {
                    Some(name) => Some(tenants.iter().position(|t| &t.name == name).ok_or_else(|| {
                        BenchError::Workload(format!("the trace names tenant '{name}', which the workload does not declare"))
                    })?),
                    None => None,
                };
                let lengths = (e.prompt_tokens, e.output_tokens, shared);
                let turn = make_turn(target, w, &model, &maker, lengths, &mut rng).await?;
                jobs.push(Job {
                    turns: vec![turn],
                    tenant,
                });
            }
            w.warmup_requests as usize
        }
        None => {
            // Warm-up conversations first, then the measured ones; each a tenant's, its first
            // turn carrying the shared prefix.
            for total in [w.warmup_requests, w.requests] {
                let mut left = total;
                while left > 0 {
                    let n = left.min(u64::from(w.turns));
                    let mut job = Job {
                        turns: Vec::with_capacity(n as usize),
                        tenant: None,
                    };
                    for k in 0..n {
                        if k == 0 {
                            job.tenant = pick_tenant(&tenants, &mut rng);
                        }
                        let own = job.tenant.map(|i| &w.tenants[i]);
                        let (p, o) = (
                            own.and_then(|t| t.prompt_tokens.as_ref())
                                .unwrap_or(&w.prompt_tokens)
                                .sample(&mut rng),
                            own.and_then(|t| t.output_tokens.as_ref())
                                .unwrap_or(&w.output_tokens)
                                .sample(&mut rng),
                        );
                        let shared = if k == 0 { shared } else { 0 };
                        let lengths = (p, o, shared);
                        job.turns
                            .push(make_turn(target, w, &model, &maker, lengths, &mut rng).await?);
                    }
                    jobs.push(job);
                    left -= n;
                }
            }
            w.warmup_requests.div_ceil(u64::from(w.turns)) as usize
        }
    };
    let (warmup, measured) = jobs.split_at(warmup_jobs);
    if let Some(path) = &opts.save_prompts {
        if w.turns > 1 {
            return Err(BenchError::Workload(
                "--save-prompts writes single requests; this workload has turns > 1".into(),
            ));
        }
        save_prompts(target, &model, measured, path).await?;
    }
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        w: w.clone(),
        model: model.clone(),
        tenants,
    });
    if !warmup.is_empty() {
        let c = match w.arrival {
            Arrival::Closed { concurrency } => concurrency,
            _ => 4,
        };
        closed(&ctx, warmup.to_vec(), c, None, None).await;
    }
    let n_measured = measured.iter().map(|j| j.turns.len() as u64).sum();
    let bar = progress_bar(opts.progress, n_measured);
    let meter = EnergyMeter::start();
    let duration = w.duration_s.map(Duration::from_secs_f64);
    let mut records = match w.arrival {
        _ if opts.trace.is_some() => {
            let schedule = opts
                .trace
                .iter()
                .flatten()
                .map(|e| Duration::from_secs_f64(e.time))
                .collect();
            open(&ctx, measured.to_vec(), schedule, duration, bar.clone()).await
        }
        Arrival::Closed { concurrency } => {
            closed(&ctx, measured.to_vec(), concurrency, duration, bar.clone()).await
        }
        _ => {
            let schedule = w
                .arrival
                .schedule(measured.len() as u64, duration, &mut rng);
            open(&ctx, measured.to_vec(), schedule, duration, bar.clone()).await
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    records.sort_by(|a, b| a.intended.total_cmp(&b.intended));
    let (summary, tenants) = judge(w, &records, opts.slo.as_ref())?;
    let energy = meter.stop(summary.total_output_tokens);
    let gpu_energy = meter.stop_gpu(summary.total_output_tokens);
    Ok(RunResult {
        url: target.base.clone(),
        model,
        workload: w.name.clone(),
        request_rate: match &opts.trace {
            Some(t) => t.len() as f64 / t.last().map_or(0.0, |e| e.time).max(1e-9),
            None => w.arrival.rate(),
        },
        max_concurrency: match w.arrival {
            Arrival::Closed { concurrency } => Some(concurrency),
            _ => None,
        },
        burstiness: match w.arrival {
            Arrival::Gamma { cv, .. } => Some(1.0 / (cv * cv)),
            Arrival::Poisson { .. } => Some(1.0),
            _ => None,
        },
        exact_prompt_lengths: maker.exact,
        summary,
        tenants,
        energy,
        gpu_energy,
        records,
    })
}

/// A run's requests summarized, as a whole and per tenant: the run meets its SLO where it meets
/// `slo` (if given) and each tenant with an SLO of its own meets that.
pub fn judge(
    w: &Workload,
    records: &[RequestRecord],
    slo: Option<&Slo>,
) -> Result<(Summary, Vec<TenantResult>), BenchError> {
    // Each tenant's own SLO, parsed once (the workload's check has validated them).
    let own: Vec<Option<Slo>> = w
        .tenants
        .iter()
        .map(|t| t.parsed_slo())
        .collect::<Result<_, String>>()
        .map_err(BenchError::Workload)?;
    let mut summary = summarize(records, slo);
    let tenants: Vec<TenantResult> = w
        .tenants
        .iter()
        .zip(&own)
        .map(|(t, own)| {
            let mine: Vec<RequestRecord> = records
                .iter()
                .filter(|r| r.tenant.as_deref() == Some(t.name.as_str()))
                .cloned()
                .collect();
            TenantResult {
                name: t.name.clone(),
                slo: t.slo.clone(),
                summary: summarize(&mine, own.as_ref().or(slo)),
            }
        })
        .collect();
    if own.iter().any(Option::is_some) && !records.is_empty() {
        summary.slo_met = Some(
            summary.slo_met != Some(false)
                && tenants
                    .iter()
                    .filter(|t| t.slo.is_some())
                    .all(|t| t.summary.slo_met == Some(true)),
        );
        // Goodput over the whole run: each request judged by its tenant's SLO (else `slo`).
        let judge_of = |r: &RequestRecord| {
            w.tenants
                .iter()
                .zip(&own)
                .find(|(t, _)| r.tenant.as_deref() == Some(t.name.as_str()))
                .and_then(|(_, s)| s.as_ref())
                .or(slo)
        };
        let good: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| judge_of(r).map_or(r.ok(), |s| s.request_ok(r)))
            .collect();
        summary.request_goodput = Some(good.len() as f64 / summary.duration);
        summary.token_goodput =
            Some(good.iter().map(|r| r.output_tokens).sum::<u64>() as f64 / summary.duration);
    }
    Ok((summary, tenants))
}

fn progress_bar(on: bool, n: u64) -> Option<indicatif::ProgressBar> {
    on.then(|| {
        let b = indicatif::ProgressBar::new(n);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} requests {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    })
}

/// A tenant drawn by weight, when the workload has tenants.
fn pick_tenant(tenants: &[TenantKey], rng: &mut impl Rng) -> Option<usize> {
    crate::workload::pick_weighted(tenants.iter().map(|t| t.weight), rng)
}

/// A request with this (prompt tokens, output tokens, shared prefix tokens).
async fn make_turn(
    target: &Target,
    w: &Workload,
    model: &str,
    maker: &PromptMaker,
    (n, max_tokens, shared): (u64, u64, u64),
    rng: &mut impl Rng,
) -> Result<Turn, BenchError> {
    let ids = maker.ids(n, shared, rng.random_range(0..maker.corpus_len().max(1)));
    let prompt = match (w.endpoint, maker.exact) {
        (Endpoint::Completions, true) => Prompt::Tokens(ids),
        (Endpoint::Chat, true) => Prompt::Text(
            target
                .detokenize(model, &ids)
                .await
                .map_err(|e| BenchError::Setup(format!("detokenize: {e}")))?,
        ),
        (_, false) => Prompt::Text(maker.words(&ids)),
    };
    Ok(Turn { prompt, max_tokens })
}

/// The prompts as text (token prompts detokenized by the server), one JSON object per line.
async fn save_prompts(
    target: &Target,
    model: &str,
    jobs: &[Job],
    path: &std::path::Path,
) -> Result<(), BenchError> {
    let mut out = String::new();
    for turn in jobs.iter().flat_map(|j| &j.turns) {
        let text = match &turn.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => target
                .detokenize(model, ids)
                .await
                .map_err(|e| BenchError::Setup(format!("detokenize: {e}")))?,
        };
        let line = serde_json::json!({"text": text, "output_length": turn.max_tokens});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    std::fs::write(path, out)
        .map_err(|e| BenchError::Setup(format!("cannot write {}: {e}", path.display())))
}

struct Ctx {
    target: Target,
    w: Workload,
    model: String,
    tenants: Vec<TenantKey>,
}

impl Ctx {
    /// Sends a conversation's turns in order, each after the last one's reply (and the think
    /// time); a later turn's intended time is when it could go. A conversation ends at its first
    /// failed turn, or when the run's time is up.
    async fn send(
        &self,
        job: &Job,
        intended: f64,
        t0: Instant,
        duration: Option<Duration>,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Vec<RequestRecord> {
        let tenant = job.tenant.map(|i| &self.tenants[i]);
        let mut history: Vec<(String, String)> = Vec::new();
        let mut out = Vec::with_capacity(job.turns.len());
        let mut intended = intended;
        for (k, turn) in job.turns.iter().enumerate() {
            if k > 0 {
                if self.w.think_time_s > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(self.w.think_time_s)).await;
                }
                if duration.is_some_and(|d| t0.elapsed() >= d) {
                    break;
                }
                intended = t0.elapsed().as_secs_f64();
            }
            let more = k + 1 < job.turns.len();
            let call = client::Call {
                model: &self.model,
                key: tenant.and_then(|t| t.key.as_deref()),
                prompt: &turn.prompt,
                max_tokens: turn.max_tokens,
                history: &history,
                keep_reply: more,
            };
            let (mut rec, reply) = client::send(&self.target, &self.w, call, intended, t0).await;
            rec.tenant = tenant.map(|t| t.name.clone());
            rec.turn = k as u32;
            let ok = rec.ok();
            out.push(rec);
            if let Some(b) = bar {
                b.inc(1);
            }
            if !ok {
                break;
            }
            if let (true, Prompt::Text(user)) = (more, &turn.prompt) {
                history.push((user.clone(), reply));
            }
        }
        out
    }
}

/// `concurrency` clients, each sending its next request as soon as its last one ends; the
/// intended time is the actual send time.
async fn closed(
    ctx: &Arc<Ctx>,
    jobs: Vec<Job>,
    concurrency: u32,
    duration: Option<Duration>,
    bar: Option<indicatif::ProgressBar>,
) -> Vec<RequestRecord> {
    let t0 = Instant::now();
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicU64::new(0));
    let out = Arc::new(Mutex::new(Vec::with_capacity(jobs.len())));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ctx, jobs, next, out, bar) = (
                ctx.clone(),
                jobs.clone(),
                next.clone(),
                out.clone(),
                bar.clone(),
            );
            tokio::spawn(async move {
                loop {
                    if duration.is_some_and(|d| t0.elapsed() >= d) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(job) = jobs.get(i) else { return };
                    let now = t0.elapsed().as_secs_f64();
                    let recs = ctx.send(job, now, t0, duration, bar.as_ref()).await;
                    out.lock().unwrap_or_else(|p| p.into_inner()).extend(recs);
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut *out)
}

/// Requests at their scheduled times, whether or not earlier ones finished.
async fn open(
    ctx: &Arc<Ctx>,
    jobs: Vec<Job>,
    schedule: Vec<Duration>,
    duration: Option<Duration>,
    bar: Option<indicatif::ProgressBar>,
) -> Vec<RequestRecord> {
    let t0 = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(jobs.len());
    for (job, at) in jobs.into_iter().zip(schedule) {
        if duration.is_some_and(|d| at >= d) {
            break;
        }
        tokio::time::sleep_until((t0 + at).into()).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (ctx, bar) = (ctx.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let recs = ctx
                .send(&job, at.as_secs_f64(), t0, duration, bar.as_ref())
                .await;
            drop(permit);
            recs
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            out.extend(r);
        }
    }
    out
}
