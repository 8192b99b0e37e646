//! `serrano sim`: performance models of inference devices you may not own (`serrano-sim`): a
//! model's roofline on catalog devices, and a workload simulated on one of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use serrano_engine::model::ModelConfig;
use serrano_engine::steptime::StepShape;
use serrano_sim::profile::Profile;
use serrano_sim::roofline::step_time;
use serrano_sim::timeline::{Averages, Timeline};
use serrano_sim::{Catalog, Device, ModelShape, Precision};

#[derive(Subcommand)]
pub enum SimCommand {
    /// A model's roofline on catalog devices (datasheet peaks scaled by the catalog's
    /// efficiency factors): decode and prefill speed ceilings, KV capacity, and cost and
    /// energy per 1M output tokens at a batch's ceiling.
    Roofline(RooflineArgs),
    /// Simulate a `serrano bench` workload file (open or closed loop) on one catalog device: the
    /// engine's own scheduler plans every step, the device's roofline times it. Prints the
    /// load generator's table (or its JSON with --json), cost at the device's price.
    Run(RunArgs),
    /// Read a running serrano's own step-time model (its `/metrics`, calibrated at start-up and
    /// refitted on every step) into a profile file that `sim run --profile` replays; or, with
    /// --measure, fit the engine's step-time model to any OpenAI-compatible server's measured
    /// latencies (a short sweep through the load generator).
    Calibrate(CalibrateArgs),
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(long, required_unless_present = "step_log")]
    url: Option<String>,
    /// Replay a serrano's `--step-log` (one server run's, from its start) through the engine's
    /// step-time model instead of reading `/metrics`: the same rows in the same order, so the
    /// same fit, without the server running.
    #[arg(long, conflicts_with_all = ["url", "measure"])]
    step_log: Option<PathBuf>,
    /// Environment variable holding an admin key (`/metrics` needs one; with --measure, any
    /// key the server takes, or none).
    #[arg(long, default_value = "SERRANO_ADMIN_KEY")]
    api_key_env: String,
    /// Measure instead of reading `/metrics`, for a server that is not serrano (vLLM,
    /// llama-server, a hosted API): one request at a time with prompts of 16 to
    /// --max-prompt tokens and one output token (each time to first token a prefill step),
    /// then batches of 1 to 16 streams of 64 tokens (each median gap a decode step), fitted
    /// with the engine's own step-time model. About a minute on a small model.
    #[arg(long)]
    measure: bool,
    /// The longest prompt --measure sends (within the server's context).
    #[arg(long, default_value_t = 1024)]
    max_prompt: u64,
    /// The engine model to read (its `model_name` label); default: the only one.
    #[arg(long)]
    model_name: Option<String>,
    /// KV cache positions of the server's engine (its log's `KV cache allocated`).
    #[arg(long, default_value_t = 46_592)]
    kv_tokens: usize,
    /// The server's --max-num-seqs and --max-batch-tokens.
    #[arg(long, default_value_t = 32)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// What the server's machine costs, dollars per hour.
    #[arg(long, default_value_t = 0.10)]
    price_per_hour: f64,
    /// Where to write the profile (TOML).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RunArgs {
    /// The workload (`serrano bench --workload`'s TOML).
    #[arg(long)]
    workload: PathBuf,
    /// The catalog device to run it on.
    #[arg(long, required_unless_present_any = ["profile", "fleet"], conflicts_with_all = ["profile", "fleet"])]
    device: Option<String>,
    /// A fleet instead of one backend: a routing config (`serrano gateway --config`'s
    /// `[routing]`, `[[backend]]`, `[tenant.*]`) whose every backend has a `sim` table
    /// (`device`, or `profile` = a `sim calibrate` file relative to the fleet file; optional
    /// `count`, `precision`, `max_num_seqs`, `max_batch_tokens`, `price_per_hour`) in place of
    /// a `url`. Requests go through the router's own strategy.
    #[arg(long, conflicts_with = "profile")]
    fleet: Option<PathBuf>,
    /// A profile from `serrano sim calibrate` instead of a device (its step-time model, KV
    /// size, step limits and price).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// A GGUF to take the model's shape from; default: the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weights and arithmetic: bf16 or int8.
    #[arg(long, default_value = "bf16", value_parser = parse_precision)]
    precision: Precision,
    /// Sequences per step (the engine's --max-num-seqs).
    #[arg(long, default_value_t = 32)]
    max_num_seqs: usize,
    /// Tokens per step (the engine's --max-batch-tokens).
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// An SLO to judge goodput by, as `serrano bench --slo` takes it.
    #[arg(long)]
    slo: Option<String>,
    /// Replay a trace (`serrano bench --trace`'s JSON lines: time, tenant, prompt_tokens,
    /// output_tokens) instead of drawing from the workload: the same requests a measured run
    /// replayed.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// A catalog file instead of the built-in catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Write the result as JSON (`serrano bench --json`'s fields, plus `timeline`: each
    /// backend's utilization, KV usage and queue length per bin of time) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HTML report (the bench report's summary and latency charts, and utilization,
    /// KV usage and queue length over time) to this file.
    #[arg(long)]
    html: Option<PathBuf>,
}

#[derive(Args)]
pub struct RooflineArgs {
    /// A GGUF to take the model's shape from (layers, widths, vocabulary); default: the
    /// default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A device of the catalog (repeatable); default: every device.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Weights and arithmetic: bf16 or int8.
    #[arg(long, default_value = "bf16", value_parser = parse_precision)]
    precision: Precision,
    /// Positions each decoding sequence attends to.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Decoding sequences in the batched row.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Prompt tokens in the prefill row (one prompt, one step).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// A catalog file (TOML, the built-in one's shape) instead of the built-in catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("'{s}': use bf16 or int8"))
}

pub fn run(cmd: SimCommand) -> Result<()> {
    match cmd {
        SimCommand::Roofline(a) => roofline(a),
        SimCommand::Run(a) => simulate(a),
        SimCommand::Calibrate(a) => calibrate(a),
    }
}

pub(crate) fn load_catalog(path: Option<&PathBuf>) -> Result<Catalog> {
    Ok(match path {
        Some(p) => Catalog::parse(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => Catalog::builtin()?,
    })
}

/// The model's path and shape (default: the default model).
pub(crate) fn model_shape(model: Option<&PathBuf>) -> Result<(PathBuf, ModelShape)> {
    let path = match model {
        Some(p) => p.clone(),
        None => serrano_models::ensure_default_model(true)?,
    };
    let gguf = serrano_engine::gguf::GgufFile::open(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config = ModelConfig::from_gguf(&gguf)?;
    let shape = ModelShape::from_config(&config, gguf.tensors.contains_key("output.weight"));
    Ok((path, shape))
}

/// The coefficients of `serrano:step_time_model{model_name,term}` in a `/metrics` text.
fn coefficients(text: &str, model_name: Option<&str>) -> Result<[f64; 4]> {
    let mut out = [None; 4];
    let terms = ["intercept", "prefill_token", "decode_seq", "kv_kilotoken"];
    for line in text
        .lines()
        .filter(|l| l.starts_with("serrano:step_time_model{"))
    {
        if model_name.is_some_and(|m| !line.contains(&format!("model_name=\"{m}\""))) {
            continue;
        }
        let Some(i) = terms
            .iter()
            .position(|t| line.contains(&format!("term=\"{t}\"")))
        else {
            continue;
        };
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if out[i].is_some() {
            anyhow::bail!("/metrics reports several engines: name one with --model-name");
        }
        out[i] = value;
    }
    let mut c = [0.0; 4];
    for (i, v) in out.iter().enumerate() {
        c[i] = v.with_context(|| {
            format!(
                "/metrics has no step-time coefficient '{}' (is the server's engine calibrated? \
                 it is at start-up unless --no-calibration)",
                terms[i]
            )
        })?;
    }
    Ok(c)
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = a.url.clone().unwrap_or_default();
    let (c, name) = if let Some(path) = &a.step_log {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let c = serrano_sim::calibrate::from_step_log(std::io::BufReader::new(file))
            .with_context(|| path.display().to_string())?;
        (c, format!("the step log {}", path.display()))
    } else if a.measure {
        let key = std::env::var(&a.api_key_env).ok();
        let base = format!("{}/v1", url.trim_end_matches('/').trim_end_matches("/v1"));
        let target = serrano_bench::Target::new(&base, key)?;
        let c = rt.block_on(serrano_sim::calibrate::measure(&target, a.max_prompt))?;
        (c, format!("measured at {url}"))
    } else {
        let key = std::env::var(&a.api_key_env)
            .with_context(|| format!("${} is not set (an admin key)", a.api_key_env))?;
        let metrics = format!("{}/metrics", url.trim_end_matches('/'));
        let text = rt
            .block_on(async {
                let r = reqwest::Client::new()
                    .get(&metrics)
                    .bearer_auth(key)
                    .send()
                    .await?;
                r.error_for_status()?.text().await
            })
            .with_context(|| format!("cannot read {metrics}"))?;
        (
            coefficients(&text, a.model_name.as_deref())?,
            format!("serrano at {url}"),
        )
    };
    let profile = Profile {
        name,
        intercept_s: c[0],
        prefill_token_s: c[1],
        decode_seq_s: c[2],
        kv_kilotoken_s: c[3],
        kv_tokens: a.kv_tokens,
        max_num_seqs: a.max_num_seqs,
        max_batch_tokens: a.max_batch_tokens,
        price_per_hour: a.price_per_hour,
    };
    std::fs::write(&a.out, profile.to_file()?)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "step = {:.3} ms + {:.4} ms/prompt token + {:.3} ms/decode + {:.4} ms/1k positions -> {}",
        c[0] * 1e3,
        c[1] * 1e3,
        c[2] * 1e3,
        c[3] * 1e3,
        a.out.display()
    );
    Ok(())
}

fn simulate(a: RunArgs) -> Result<()> {
    if let Some(p) = &a.profile {
        let profile = Profile::load(p)?;
        let backend = profile.backend(None);
        let assumptions = format!(
            "the step-time model of {} and ${}/h",
            profile.name, profile.price_per_hour
        );
        return report(
            &a,
            &backend,
            &profile.name,
            profile.price_per_hour,
            &assumptions,
        );
    }
    let catalog = load_catalog(a.catalog.as_ref())?;
    if let Some(path) = &a.fleet {
        return simulate_fleet(&a, path, &catalog);
    }
    let name = a.device.as_deref().unwrap_or_default();
    let device = catalog.device(name)?.clone();
    let (path, model) = model_shape(a.model.as_ref())?;
    let backend = serrano_sim::sim::Backend {
        timing: serrano_sim::sim::Timing::Roofline {
            device: device.clone(),
            model,
            precision: a.precision,
        },
        scheduler: serrano_engine::scheduler::SchedulerConfig {
            max_num_seqs: a.max_num_seqs.max(1),
            max_batch_tokens: a.max_batch_tokens.max(1),
        },
    };
    let name = path
        .file_name()
        .map_or_else(|| "model".to_string(), |f| f.to_string_lossy().into_owned());
    let assumptions = format!(
        "{} {} at the catalog's efficiencies (compute {}, memory {}, {} us a step), ${}/h and \
         {} W (cost and energy for the whole run: energy an upper bound)",
        device.name,
        a.precision.as_str(),
        device.compute_efficiency,
        device.memory_efficiency,
        device.step_overhead_us,
        device.price_per_hour,
        device.power_w,
    );
    report(&a, &backend, &name, device.price_per_hour, &assumptions)
}

/// `sim run --fleet`: the fleet behind its router, one table for the whole fleet, and the
/// requests each backend took.
fn simulate_fleet(a: &RunArgs, path: &Path, catalog: &Catalog) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // The model's shape only if a catalog device needs it (a fleet of calibrated profiles
    // needs no weights).
    let mut loaded: Option<(PathBuf, ModelShape)> = None;
    let mut shape = || {
        if let Some((_, shape)) = &loaded {
            return Ok(shape.clone());
        }
        let (path, shape) = model_shape(a.model.as_ref()).map_err(|e| format!("{e:#}"))?;
        loaded = Some((path, shape.clone()));
        Ok(shape)
    };
    let fleet = serrano_sim::fleet::Fleet::parse(&text, catalog, &mut shape, dir)?;
    let (workload, slo, trace) = run_inputs(a)?;
    let name = loaded
        .as_ref()
        .map(|(path, _)| path.as_path())
        .or(a.model.as_deref())
        .and_then(|p| p.file_name())
        .map_or_else(|| "model".to_string(), |f| f.to_string_lossy().into_owned());
    let started = std::time::Instant::now();
    let run = serrano_sim::fleet::run(
        &fleet,
        &workload,
        trace.as_deref(),
        slo.as_ref(),
        &name,
        None,
    )?;
    let price = serrano_bench::report::Price {
        per_hour: Some(fleet.price_per_hour()),
        ..Default::default()
    };
    let names: Vec<String> = fleet
        .config
        .backends
        .iter()
        .map(|b| b.name.clone())
        .collect();
    let backends: Vec<serde_json::Value> = names
        .iter()
        .zip(&fleet.backends)
        .zip(run.taken.iter().zip(&fleet.prices))
        .map(|((name, sim), (n, price))| {
            json!({ "name": name, "device": sim.timing.name(), "requests": n, "price_per_hour": price })
        })
        .collect();
    let label = format!("fleet of {}", fleet.backends.len());
    let about = json!({
        "strategy": fleet.config.routing.strategy.as_str(),
        "backends": backends,
    });
    write_outputs(a, &label, &run, &names, &price, Some(("fleet", about)))?;
    print!(
        "{}",
        serrano_bench::report::table(&[(label.as_str(), &run.result)], Some(&price))
    );
    println!(
        "Routed by {} ({}); busy is the share of the run a step was in flight, the peaks the \
         highest bin's ({:.3} s; --json and --html have every bin):",
        fleet.config.routing.strategy.as_str(),
        path.display(),
        run.timeline.bin_s(),
    );
    for (k, b) in backends.iter().enumerate() {
        let (busy, kv, queue) = run.timeline.overall(k);
        println!(
            "  {:<24} {:<16} {:>7} requests  ${:.2}/h  busy {:>5.1}%  KV peak {:>5.1}%  queue peak {queue:>6.1}",
            b["name"].as_str().unwrap_or(""),
            b["device"].as_str().unwrap_or(""),
            b["requests"].as_u64().unwrap_or(0),
            b["price_per_hour"].as_f64().unwrap_or(0.0),
            busy * 100.0,
            kv * 100.0,
        );
    }
    println!(
        "Simulated {} requests in {:.2} s of this machine's time. Assumptions: each device's \
         roofline at the catalog's efficiencies or each profile's calibrated step model, \
         ${:.2}/h for the fleet and each device at its board power for the whole run (energy \
         an upper bound; none when a backend is a profile); the engine's scheduler and pacing on every backend (each \
         request in its tenant's class, interactive unless the fleet file says batch; default \
         targets); the router's own plans and concurrency limits.",
        run.result.records.len(),
        started.elapsed().as_secs_f64(),
        fleet.price_per_hour(),
    );
    Ok(())
}

/// The workload, SLO and trace a `sim run` reads.
type RunInputs = (
    serrano_bench::Workload,
    Option<serrano_bench::Slo>,
    Option<Vec<serrano_bench::workload::TraceEntry>>,
);

/// A workload file (TOML) and an `--slo`, as `sim run` and `plan` read them.
pub(crate) fn workload_and_slo(
    path: &Path,
    slo: Option<&str>,
) -> Result<(serrano_bench::Workload, Option<serrano_bench::Slo>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let workload = serrano_bench::Workload::parse(&text, false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let slo = slo
        .map(serrano_bench::Slo::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
    Ok((workload, slo))
}

fn run_inputs(a: &RunArgs) -> Result<RunInputs> {
    let (workload, slo) = workload_and_slo(&a.workload, a.slo.as_deref())?;
    let trace = match &a.trace {
        Some(p) => Some(
            serrano_bench::workload::parse_trace(
                &std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    Ok((workload, slo, trace))
}

/// Runs the simulation and prints (and writes) its result.
fn report(
    a: &RunArgs,
    backend: &serrano_sim::sim::Backend,
    name: &str,
    price_per_hour: f64,
    assumptions: &str,
) -> Result<()> {
    let (workload, slo, trace) = run_inputs(a)?;
    let started = std::time::Instant::now();
    let run = serrano_sim::sim::run(backend, &workload, trace.as_deref(), slo.as_ref(), name)?;
    let price = serrano_bench::report::Price {
        per_hour: Some(price_per_hour),
        ..Default::default()
    };
    let label = backend.timing.name();
    write_outputs(a, label, &run, &[label.to_string()], &price, None)?;
    print!(
        "{}",
        serrano_bench::report::table(&[(label, &run.result)], Some(&price))
    );
    print_timeline(&run.timeline, &[label.to_string()]);
    println!(
        "Simulated {} requests in {:.2} s of this machine's time. Assumptions: {assumptions}; \
         the engine's scheduler and pacing (every request interactive, default targets).",
        run.result.records.len(),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// `--json` (`serrano bench --json`'s fields, the timeline, and `extra`'s fields) and `--html`
/// (the bench report's summary and charts, and the timeline's).
fn write_outputs(
    a: &RunArgs,
    label: &str,
    run: &serrano_sim::sim::SimRun,
    names: &[String],
    price: &serrano_bench::report::Price,
    extra: Option<(&str, serde_json::Value)>,
) -> Result<()> {
    if let Some(out) = &a.json {
        let mut v = serrano_bench::report::to_json(&run.result, Some(price));
        v["timeline"] = timeline_json(&run.timeline, names);
        if let Some((key, value)) = extra {
            v[key] = value;
        }
        std::fs::write(out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(out) = &a.html {
        let title = format!("serrano sim: {} on {label}", run.result.workload);
        let html = serrano_bench::html::report(
            &title,
            &[(label, &run.result)],
            &[],
            Some(price),
            &timeline_html(&run.timeline, names),
        );
        std::fs::write(out, html).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// The timeline as JSON: the bin width and each backend's averages per bin.
fn timeline_json(t: &Timeline, names: &[String]) -> serde_json::Value {
    let backends: Vec<serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let a = t.averages(k);
            json!({
                "name": name,
                "utilization": a.utilization,
                "kv_usage": a.kv_usage,
                "queue": a.queue,
            })
        })
        .collect();
    json!({ "bin_s": t.bin_s(), "backends": backends })
}

/// Most backends drawn one line each in the HTML charts; a bigger fleet is drawn as its mean
/// (utilization, KV) and total (queue), so the charts stay readable.
const MAX_CHART_SERIES: usize = 8;

/// Utilization, KV usage and queue length over time as the bench report's line charts.
fn timeline_html(t: &Timeline, names: &[String]) -> String {
    let bin = t.bin_s();
    let points = |v: &[f64], scale: f64| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(b, y)| ((b as f64 + 0.5) * bin, y * scale))
            .collect()
    };
    let all: Vec<_> = (0..names.len()).map(|k| t.averages(k)).collect();
    let series = |f: fn(&Averages) -> &Vec<f64>, scale: f64, total: bool| {
        if all.len() <= MAX_CHART_SERIES {
            return names
                .iter()
                .zip(&all)
                .map(|(n, a)| (n.clone(), points(f(a), scale)))
                .collect::<Vec<_>>();
        }
        let bins = all.iter().map(|a| f(a).len()).max().unwrap_or(0);
        let combined: Vec<f64> = (0..bins)
            .map(|b| {
                let sum: f64 = all
                    .iter()
                    .map(|a| f(a).get(b).copied().unwrap_or(0.0))
                    .sum();
                if total {
                    sum
                } else {
                    sum / all.len() as f64
                }
            })
            .collect();
        let label = if total { "fleet total" } else { "fleet mean" };
        vec![(
            format!("{label} of {}", all.len()),
            points(&combined, scale),
        )]
    };
    let chart = serrano_bench::html::line_chart;
    format!(
        "<h2>Over time (bins of {bin:.3} s)</h2><div class=\"charts\">{}{}{}</div>",
        chart(
            "Utilization",
            "seconds",
            "% of the time a step is in flight",
            &series(|a| &a.utilization, 100.0, false),
        ),
        chart(
            "KV cache in use",
            "seconds",
            "% of blocks",
            &series(|a| &a.kv_usage, 100.0, false),
        ),
        chart(
            "Queue",
            "seconds",
            "requests waiting for admission",
            &series(|a| &a.queue, 1.0, true),
        ),
    )
}

/// A line per backend: busy share, and the highest bin's KV usage and queue.
fn print_timeline(t: &Timeline, names: &[String]) {
    println!(
        "Over the run (bins of {:.3} s; --json and --html have every bin):",
        t.bin_s()
    );
    for (k, name) in names.iter().enumerate() {
        let (busy, kv, queue) = t.overall(k);
        println!(
            "  {name:<24} busy {:>5.1}%  KV peak {:>5.1}%  queue peak {queue:>6.1}",
            busy * 100.0,
            kv * 100.0
        );
    }
}

fn roofline(a: RooflineArgs) -> Result<()> {
    let catalog = load_catalog(a.catalog.as_ref())?;
    let devices: Vec<&Device> = if a.devices.is_empty() {
        catalog.devices.iter().collect()
    } else {
        a.devices
            .iter()
            .map(|n| catalog.device(n))
            .collect::<Result<_, _>>()?
    };
    let (path, shape) = model_shape(a.model.as_ref())?;
    let rows: Vec<serde_json::Value> = devices.iter().map(|d| row(d, &shape, &a)).collect();
    if a.json {
        let out = json!({
            "model": path.display().to_string(),
            "params": shape.total_params,
            "precision": a.precision.as_str(),
            "context": a.context,
            "batch": a.batch,
            "prompt_tokens": a.prompt_tokens,
            "devices": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} ({:.1} M parameters), {}, decoding sequences attend {} positions each",
        path.display(),
        shape.total_params / 1e6,
        a.precision.as_str(),
        a.context
    );
    println!(
        "{:<16} {:>9} {:>11} {:>11} {:>12} {:>12} {:>13} {:>11}",
        "device",
        "weights",
        "KV tokens",
        "decode 1",
        &format!("decode {}", a.batch),
        &format!("prefill {}", a.prompt_tokens),
        "$/1M out",
        "J/token"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<16} {:>7.2}GB {:>11} {:>7.0} t/s {:>8.0} t/s {:>8.0} t/s {:>13.4} {:>11.4}",
            r["device"].as_str().unwrap_or(""),
            f("weights_gb"),
            r["kv_capacity_tokens"]
                .as_f64()
                .map_or("no fit".to_string(), |t| format!("{:.0}k", t / 1e3)),
            f("decode_tok_s"),
            f("batch_decode_tok_s"),
            f("prefill_tok_s"),
            f("usd_per_1m_output_tokens"),
            f("joules_per_token"),
        );
    }
    println!(
        "Assumptions: each device's compute and memory efficiency and step overhead as the \
         catalog states them (defaults 0.5, 0.8, 100 us); weights read once per step; KV in f16; \
         costs at the batched ceiling with the device busy all hour at its catalog price and \
         board power. Ceilings, not forecasts: `serrano sim` will add queueing and the scheduler."
    );
    Ok(())
}

fn row(d: &Device, m: &ModelShape, a: &RooflineArgs) -> serde_json::Value {
    let decode = |n: usize| {
        let s = StepShape {
            prefill_tokens: 0,
            decode_seqs: n,
            kv_tokens: n * a.context,
        };
        step_time(d, m, a.precision, s, n)
    };
    let one = decode(1);
    let batch = decode(a.batch.max(1));
    let p = a.prompt_tokens.max(1);
    let prefill = step_time(
        d,
        m,
        a.precision,
        StepShape {
            prefill_tokens: p,
            decode_seqs: 0,
            // Token i attends to i + 1 positions.
            kv_tokens: p * (p + 1) / 2,
        },
        1,
    );
    let batch_tok_s = a.batch.max(1) as f64 / batch.seconds;
    json!({
        "device": d.name,
        "weights_gb": m.weight_bytes(a.precision) / 1e9,
        "kv_capacity_tokens": m.kv_capacity_tokens(d, a.precision),
        "decode_step_ms": one.seconds * 1e3,
        "decode_tok_s": 1.0 / one.seconds,
        "batch_decode_step_ms": batch.seconds * 1e3,
        "batch_decode_tok_s": batch_tok_s,
        "batch_compute_bound": batch.compute_bound,
        "prefill_tok_s": p as f64 / prefill.seconds,
        "usd_per_1m_output_tokens": d.price_per_hour / (batch_tok_s * 3600.0) * 1e6,
        "joules_per_token": d.power_w / batch_tok_s,
        "compute_efficiency": d.compute_efficiency,
        "memory_efficiency": d.memory_efficiency,
        "step_overhead_us": d.step_overhead_us,
        "source": d.source,
    })
}
