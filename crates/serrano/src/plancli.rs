//! `serrano plan`: the cheapest fleet of catalog (or what-if) devices that serves a traffic
//! forecast within its SLO (`serrano_sim::plan`), printed with every assumption it rests on.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};
use serrano_sim::fleet::{DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_NUM_SEQS};
use serrano_sim::plan::{Choice, Forecast, Offer, Plan};
use serrano_sim::sim::{Backend, Timing};
use serrano_sim::{Catalog, Device, ModelShape, Precision};

use crate::simcli::{load_catalog, model_shape, parse_precision, workload_and_slo};

#[derive(Args)]
pub struct PlanArgs {
    /// The traffic's shape: a `serrano bench --workload` TOML (lengths, tenants and their
    /// SLOs, arrival process, seed). Open loop only.
    #[arg(long)]
    workload: PathBuf,
    /// Peak requests per second (default: the workload's rate).
    #[arg(long)]
    rate: Option<f64>,
    /// Plan for the peak rate times this: 1.5 serves a burst half again above the peak.
    #[arg(long, default_value_t = 1.5)]
    headroom: f64,
    /// The SLO every request is judged by, as `serrano bench --slo` takes it
    /// (ttft_p99=1s,tpot_p99=50ms); a tenant's own `slo` in the workload replaces it for
    /// that tenant.
    #[arg(long)]
    slo: Option<String>,
    /// A device to consider (repeatable; default: every catalog device): a catalog name, or a
    /// what-if device NEW=BASE,FIELD=VALUE,... (FIELD=xK scales it), e.g.
    /// 'asic=h100-sxm,memory_gbs=x2' for an H100 with twice the bandwidth per watt.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// A catalog model to plan for without its weights (llama-3.1-8b, llama-3.1-70b,
    /// smollm2-135m); default: the shape of --model's GGUF.
    #[arg(long, conflicts_with = "model")]
    model_shape: Option<String>,
    /// A GGUF to take the model's shape from; default: the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weights and arithmetic on every device: bf16 or int8.
    #[arg(long, default_value = "bf16", value_parser = parse_precision)]
    precision: Precision,
    /// Each backend's scheduler: most sequences in one step (vLLM's default).
    #[arg(long, default_value_t = DEFAULT_MAX_NUM_SEQS)]
    max_num_seqs: usize,
    /// Each backend's scheduler: most tokens in one step (prompt chunks plus decodes).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Seconds of traffic simulated at each point: the rate times this many requests (at
    /// least the workload's `requests`, at most 50,000); longer gives a steadier p99 and a
    /// slower answer.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// A diurnal curve: each hour's rate as a fraction of the peak (--rate), comma-separated
    /// (1 to 168 hours, each 0 to 1), or @FILE holding them (commas, spaces or lines; `#`
    /// comments). Adds what a day costs on a fleet fixed at the peak's size against one
    /// resized every hour, e.g. bench/diurnal/weekday.txt.
    #[arg(long)]
    diurnal: Option<String>,
    /// Most backends of one type (at most 256, the router's limit).
    #[arg(long, default_value_t = 64)]
    max_count: usize,
    /// A catalog file instead of the built-in catalog.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Write the plan as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let catalog = load_catalog(a.catalog.as_ref())?;
    let (model_name, model) = match &a.model_shape {
        Some(name) => (name.clone(), ModelShape::from_spec(catalog.model(name)?)),
        None => {
            let (path, shape) = model_shape(a.model.as_ref())?;
            (path.display().to_string(), shape)
        }
    };
    let devices = devices(&catalog, &a.devices)?;
    let offers: Vec<Offer> = devices.iter().map(|d| offer(d, &model, &a)).collect();
    let (workload, slo) = workload_and_slo(&a.workload, a.slo.as_deref())?;
    let curve = a.diurnal.as_deref().map(diurnal).transpose()?;
    let forecast = Forecast {
        workload: &workload,
        slo: slo.as_ref(),
        rate: a.rate.unwrap_or_else(|| workload.arrival.rate()),
        headroom: a.headroom,
        duration_s: a.duration,
        max_count: a.max_count,
        diurnal: curve.as_deref(),
    };
    let started = std::time::Instant::now();
    let plan = serrano_sim::plan::plan(&offers, &forecast)?;
    let elapsed = started.elapsed().as_secs_f64();
    let assumptions = assumptions(&a, &forecast, &devices, &model_name, &plan);
    if let Some(out) = &a.json {
        let v = to_json(&plan, &offers, &forecast, &model_name, &assumptions);
        std::fs::write(out, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    print!("{}", report(&plan, &offers, &forecast, &model_name));
    println!("Assumptions:");
    for line in &assumptions {
        println!("  - {line}");
    }
    println!("Planned in {elapsed:.1} s of this machine's time.");
    Ok(())
}

/// A diurnal curve from `--diurnal`: numbers, or @FILE of numbers.
fn diurnal(arg: &str) -> Result<Vec<f64>> {
    let text = match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => arg.to_string(),
    };
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f64>()
                .with_context(|| format!("--diurnal: '{t}' is not a number"))
        })
        .collect()
}

/// The devices asked for (catalog names or what-if devices), or every catalog device.
fn devices(catalog: &Catalog, asked: &[String]) -> Result<Vec<Device>> {
    if asked.is_empty() {
        return Ok(catalog.devices.clone());
    }
    let mut out: Vec<Device> = Vec::new();
    for spec in asked {
        let d = catalog.variant(spec)?;
        if out.iter().any(|o| o.name == d.name) {
            anyhow::bail!("--device {}: named twice", d.name);
        }
        out.push(d);
    }
    Ok(out)
}

fn offer(d: &Device, model: &ModelShape, a: &PlanArgs) -> Offer {
    Offer {
        name: d.name.clone(),
        price_per_hour: d.price_per_hour,
        backend: Backend {
            timing: Timing::Roofline {
                device: d.clone(),
                model: model.clone(),
                precision: a.precision,
            },
            scheduler: serrano_engine::scheduler::SchedulerConfig {
                max_num_seqs: a.max_num_seqs.max(1),
                max_batch_tokens: a.max_batch_tokens.max(1),
            },
        },
    }
}

/// `2 x h100-sxm + 1 x asic`.
fn mix(c: &Choice, offers: &[Offer]) -> String {
    c.mix
        .iter()
        .map(|&(i, n)| format!("{n} x {}", offers[i].name))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} ms"))
}

fn report(p: &Plan, offers: &[Offer], f: &Forecast, model: &str) -> String {
    let mut out = String::new();
    let target = f.rate * f.headroom;
    out += &format!(
        "Plan for {model}: {:.3} requests/s at the peak, sized for {target:.3} (headroom \
         {:.2}); {:.0} output tokens a request.\n",
        f.rate, f.headroom, p.output_tokens_per_request
    );
    if let Some(best) = p.best() {
        out += &format!(
            "Cheapest fleet: {}, ${:.2}/h, ${:.4} per 1M output tokens at the peak (p99 TTFT {}, \
             p99 TPOT {} at {target:.3} requests/s).\n\n",
            mix(best, offers),
            best.price_per_hour,
            best.usd_per_1m_output_tokens,
            ms(best.summary.ttft.p(99.0)),
            ms(best.summary.tpot.p(99.0)),
        );
    }
    out += &format!(
        "{:<20} {:>6} {:>9} {:>10} {:>9} {:>9} {:>16}\n",
        "device alone", "count", "$/h", "$/1M out", "p99 TTFT", "p99 TPOT", "one's capacity"
    );
    for (i, c) in p.single.iter().enumerate() {
        match c {
            Ok(c) => {
                out += &format!(
                    "{:<20} {:>6} {:>9.2} {:>10.4} {:>9} {:>9} {:>16}\n",
                    offers[i].name,
                    c.mix[0].1,
                    c.price_per_hour,
                    c.usd_per_1m_output_tokens,
                    ms(c.summary.ttft.p(99.0)),
                    ms(c.summary.tpot.p(99.0)),
                    p.capacity[i].map_or("-".into(), |r| format!("{r:.3} req/s")),
                )
            }
            Err(why) => out += &format!("{:<20} none: {why}\n", offers[i].name),
        }
    }
    match &p.mixed {
        Some(m) => {
            out += &format!(
            "Mixed: {} is cheaper than any type alone: ${:.2}/h, ${:.4} per 1M output tokens.\n",
            mix(m, offers),
            m.price_per_hour,
            m.usd_per_1m_output_tokens
        )
        }
        None if offers.len() > 1 => {
            out += "Mixed: no fleet of two types is cheaper than the cheapest type alone.\n"
        }
        None => {}
    }
    out += "\nCost against headroom (count and $/h of each type alone):\n";
    out += &format!("{:>9}", "headroom");
    for o in offers {
        out += &format!(" {:>20}", o.name);
    }
    out += "\n";
    for (h, row) in &p.frontier {
        out += &format!("{h:>9.2}");
        for c in row {
            let cell = c.as_ref().map_or("-".into(), |c| {
                format!("{} ${:.2}", c.mix[0].1, c.price_per_hour)
            });
            out += &format!(" {cell:>20}");
        }
        out += "\n";
    }
    if let Some((i, _)) = p.cheapest_single() {
        if !p.provisioning.is_empty() {
            out += &format!(
                "\nOver-provisioning ({} at the peak rate; utilization is the peak over the \
                 count times one backend's SLO capacity):\n{:>6} {:>12} {:>10}\n",
                offers[i].name, "count", "utilization", "$/1M out"
            );
            for r in &p.provisioning {
                out += &format!(
                    "{:>6} {:>11.0}% {:>10.4}\n",
                    r.count,
                    r.utilization * 100.0,
                    r.usd_per_1m_output_tokens
                );
            }
        }
        if let Some(d) = &p.day {
            out += &format!(
                "\nOver the {} hours of the diurnal curve ({}, peak {:.3} requests/s):\n\
                 {:<34} {:>10} {:>10} {:>12}\n",
                d.rates.len(),
                offers[d.offer].name,
                f.rate,
                "",
                "$ a day",
                "$/1M out",
                "utilization"
            );
            let hours = d.rates.len() as f64;
            out += &format!(
                "{:<34} {:>10.2} {:>10.4} {:>12}\n",
                format!("fixed at {} (the peak's)", d.fixed_count),
                d.fixed_usd * 24.0 / hours,
                d.fixed_usd_per_1m(),
                d.fixed_utilization
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0))
            );
            out += &format!(
                "{:<34} {:>10.2} {:>10.4}\n  hourly counts: {:?}\n",
                "resized every hour",
                d.autoscaled_usd * 24.0 / hours,
                d.autoscaled_usd_per_1m(),
                d.counts
            );
        }
        if !p.sensitivity.is_empty() {
            out += &format!(
                "\nSensitivity ({}: $/1M output tokens of one backend at its SLO capacity, each \
                 figure changed alone):\n",
                offers[i].name
            );
            for s in &p.sensitivity {
                out += &format!(
                    "  {:<26} {:>+7.1}%  ${:.4}\n",
                    s.change, s.change_pct, s.usd_per_1m_output_tokens
                );
            }
        }
    }
    out
}

fn assumptions(
    a: &PlanArgs,
    f: &Forecast,
    devices: &[Device],
    model: &str,
    p: &Plan,
) -> Vec<String> {
    let mut out = vec![
        format!(
            "traffic: {} (seed {}), {} arrivals at the rate asked; each point simulates {} s \
             of it ({} to {} requests, after {} warm-up) and judges p99 over those; \
             open loop, one turn a conversation",
            a.workload.display(),
            f.workload.seed,
            arrivals(&f.workload.arrival),
            f.duration_s,
            f.workload.requests.min(serrano_sim::plan::MAX_REQUESTS),
            serrano_sim::plan::MAX_REQUESTS,
            f.workload.warmup_requests,
        ),
        format!(
            "SLO: {}{}",
            a.slo.as_deref().unwrap_or("none for the run"),
            if f.workload.tenants.iter().any(|t| t.slo.is_some()) {
                "; tenants with their own slo are judged by it"
            } else {
                ""
            }
        ),
        format!(
            "model: {model} in {}, one whole copy per device (no tensor or pipeline \
             parallelism), KV cache in f16 in the memory its weights leave",
            a.precision.as_str()
        ),
        format!(
            "each backend: the engine's scheduler ({} sequences, {} tokens a step) and pacing, \
             every request interactive; steps timed by the device's roofline",
            a.max_num_seqs, a.max_batch_tokens
        ),
        "routing: the router's least-loaded strategy over every backend of the fleet".into(),
        "counts are searched (doubling, then bisecting), assuming more backends never miss \
         the SLO where fewer met it"
            .into(),
        "cost per 1M output tokens is the fleet's hourly price over the peak rate's output \
         tokens for an hour: a lower traffic average (a diurnal trough) costs more per token"
            .into(),
        "how far to trust the simulator: BENCHMARKS.md, \"The simulator's validation\" \
         (scripts/sim-validate.sh: a calibrated engine against measured runs of held-out loads); \
         the datasheet devices' efficiency factors are assumptions no run here has checked"
            .into(),
    ];
    for d in devices {
        out.push(format!(
            "{}: {} TFLOPS BF16, {} TOPS INT8, {} GB/s, {} GB, {} W, ${}/h; compute efficiency \
             {}, memory efficiency {}, {} us a step ({})",
            d.name,
            d.bf16_tflops,
            d.int8_tops,
            d.memory_gbs,
            d.memory_gb,
            d.power_w,
            d.price_per_hour,
            d.compute_efficiency,
            d.memory_efficiency,
            d.step_overhead_us,
            d.source
        ));
    }
    if p.day.is_some() {
        out.push(
            "the day: each hour's rate steady for the hour; resizing is instant and exact (an \
             autoscaler's lag and its cold starts are not modelled); $ a day scales the curve's \
             hours to 24"
                .into(),
        );
    }
    if !p.sensitivity.is_empty() {
        out.push(
            "sensitivity: each figure 25% better alone (price and step overhead divided by \
             1.25), one backend's SLO capacity searched again"
                .into(),
        );
    }
    out
}

/// The arrival process without its rate (the plan's rate replaces it).
fn arrivals(a: &serrano_bench::workload::Arrival) -> String {
    use serrano_bench::workload::Arrival;
    match a {
        Arrival::Constant { .. } => "evenly spaced".into(),
        Arrival::Gamma { cv, .. } => format!("gamma (bursts, cv {cv})"),
        _ => "Poisson".into(),
    }
}

fn choice_json(c: &Choice, offers: &[Offer]) -> Value {
    json!({
        "fleet": c.mix.iter().map(|&(i, n)| json!({"device": offers[i].name, "count": n})).collect::<Vec<_>>(),
        "price_per_hour": c.price_per_hour,
        "usd_per_1m_output_tokens": c.usd_per_1m_output_tokens,
        "p99_ttft_ms": c.summary.ttft.p(99.0),
        "p99_tpot_ms": c.summary.tpot.p(99.0),
    })
}

fn to_json(p: &Plan, offers: &[Offer], f: &Forecast, model: &str, assumptions: &[String]) -> Value {
    json!({
        "model": model,
        "rate": f.rate,
        "headroom": f.headroom,
        "output_tokens_per_request": p.output_tokens_per_request,
        "best": p.best().map(|c| choice_json(c, offers)),
        "devices": p.single.iter().enumerate().map(|(i, c)| match c {
            Ok(c) => {
                let mut v = choice_json(c, offers);
                v["device"] = json!(offers[i].name);
                v["capacity_rate"] = json!(p.capacity[i]);
                v
            }
            Err(why) => json!({"device": offers[i].name, "none": why}),
        }).collect::<Vec<_>>(),
        "mixed": p.mixed.as_ref().map(|c| choice_json(c, offers)),
        "frontier": p.frontier.iter().map(|(h, row)| json!({
            "headroom": h,
            "devices": row.iter().map(|c| c.as_ref().map(|c| choice_json(c, offers))).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "provisioning": p.provisioning.iter().map(|r| json!({
            "count": r.count,
            "utilization": r.utilization,
            "usd_per_1m_output_tokens": r.usd_per_1m_output_tokens,
        })).collect::<Vec<_>>(),
        "sensitivity": p.sensitivity.iter().map(|s| json!({
            "change": s.change,
            "change_pct": s.change_pct,
            "usd_per_1m_output_tokens": s.usd_per_1m_output_tokens,
        })).collect::<Vec<_>>(),
        "day": p.day.as_ref().map(|d| json!({
            "device": offers[d.offer].name,
            "hourly_rates": d.rates,
            "hourly_counts": d.counts,
            "fixed_count": d.fixed_count,
            "fixed_usd": d.fixed_usd,
            "autoscaled_usd": d.autoscaled_usd,
            "output_tokens": d.output_tokens,
            "fixed_usd_per_1m_output_tokens": d.fixed_usd_per_1m(),
            "autoscaled_usd_per_1m_output_tokens": d.autoscaled_usd_per_1m(),
            "fixed_utilization": d.fixed_utilization,
        })),
        "assumptions": assumptions,
    })
}
