//! `serrano sim`: performance models of inference devices you may not own (`serrano-sim`): a
//! model's roofline on catalog devices, and a workload simulated on one of them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use serrano_engine::model::ModelConfig;
use serrano_engine::steptime::StepShape;
use serrano_sim::roofline::step_time;
use serrano_sim::{Catalog, Device, ModelShape, Precision};

#[derive(Subcommand)]
pub enum SimCommand {
    /// A model's roofline on catalog devices (datasheet peaks scaled by the catalog's
    /// efficiency factors): decode and prefill speed ceilings, KV capacity, and cost and
    /// energy per 1M output tokens at a batch's ceiling.
    Roofline(RooflineArgs),
    /// Simulate a `serrano bench` workload file (open loop) on one catalog device: the
    /// engine's own scheduler plans every step, the device's roofline times it. Prints the
    /// load generator's table (or its JSON with --json), cost at the device's price.
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The workload (`serrano bench --workload`'s TOML).
    #[arg(long)]
    workload: PathBuf,
    /// The catalog device to run it on.
    #[arg(long)]
    device: String,
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
    /// A catalog file instead of the built-in catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Write the result as JSON (`serrano bench --json`'s fields) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
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

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("'{s}': use bf16 or int8"))
}

pub fn run(cmd: SimCommand) -> Result<()> {
    match cmd {
        SimCommand::Roofline(a) => roofline(a),
        SimCommand::Run(a) => simulate(a),
    }
}

fn load_catalog(path: Option<&PathBuf>) -> Result<Catalog> {
    Ok(match path {
        Some(p) => Catalog::parse(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => Catalog::builtin()?,
    })
}

/// The model's path and shape (default: the default model).
fn model_shape(model: Option<&PathBuf>) -> Result<(PathBuf, ModelShape)> {
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

fn simulate(a: RunArgs) -> Result<()> {
    let catalog = load_catalog(a.catalog.as_ref())?;
    let device = catalog.device(&a.device)?.clone();
    let (path, model) = model_shape(a.model.as_ref())?;
    let text = std::fs::read_to_string(&a.workload)
        .with_context(|| format!("cannot read {}", a.workload.display()))?;
    let workload = serrano_bench::Workload::parse(&text, false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.workload.display()))?;
    let slo = a
        .slo
        .as_deref()
        .map(serrano_bench::Slo::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
    let backend = serrano_sim::sim::Backend {
        device: device.clone(),
        model,
        precision: a.precision,
        scheduler: serrano_engine::scheduler::SchedulerConfig {
            max_num_seqs: a.max_num_seqs.max(1),
            max_batch_tokens: a.max_batch_tokens.max(1),
        },
    };
    let name = path
        .file_name()
        .map_or_else(|| "model".to_string(), |f| f.to_string_lossy().into_owned());
    let started = std::time::Instant::now();
    let result = serrano_sim::sim::run(&backend, &workload, slo.as_ref(), &name)?;
    let price = serrano_bench::report::Price {
        per_hour: Some(device.price_per_hour),
        ..Default::default()
    };
    if let Some(out) = &a.json {
        let v = serrano_bench::report::to_json(&result, Some(&price));
        std::fs::write(out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    print!(
        "{}",
        serrano_bench::report::table(&[(device.name.as_str(), &result)], Some(&price))
    );
    println!(
        "Simulated {} requests in {:.2} s of this machine's time. Assumptions: {} {} at the \
         catalog's efficiencies (compute {}, memory {}, {} us a step) and ${}/h; the engine's \
         scheduler without its latency-class step caps; open loop only.",
        result.records.len(),
        started.elapsed().as_secs_f64(),
        device.name,
        a.precision.as_str(),
        device.compute_efficiency,
        device.memory_efficiency,
        device.step_overhead_us,
        device.price_per_hour,
    );
    Ok(())
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
