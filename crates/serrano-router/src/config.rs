//! The routing config: one TOML file that declares backends, routes, tenants' routing policies
//! and filters, and prices. Secrets appear only as the names of environment variables.
//!
//! Parsing is strict (unknown fields are errors) and every error names the line and the field,
//! so that `serrano config check` can point at the mistake.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

/// Largest config file accepted (a config is a few KiB; this is a bound on bad input).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Most backends one config may declare.
pub const MAX_BACKENDS: usize = 256;
/// Longest backend, region, tier or tenant name.
const MAX_NAME_CHARS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The cheapest backend whose live p95 latency estimate meets the SLO.
    CheapestWithinSlo,
    /// The backend with the smallest share of its concurrency limit in use.
    LeastLoaded,
    /// Smooth weighted round robin (canaries): exact proportions, no randomness.
    Weighted,
    /// The first eligible backend in the route's order (ordered failover).
    Priority,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::CheapestWithinSlo => "cheapest-within-slo",
            Strategy::LeastLoaded => "least-loaded",
            Strategy::Weighted => "weighted",
            Strategy::Priority => "priority",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The in-process engine of `serrano serve`.
    Local,
    /// Any OpenAI-compatible server.
    Openai,
    /// A device that may not exist: its pace modelled (`sim`, see [`SimTier`]), its tokens
    /// from this process's engine.
    Sim,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Openai => "openai",
            Kind::Sim => "sim",
        }
    }
}

/// A `sim` backend's `sim = { ... }`: what its pace is modelled on (serrano-sim reads it).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimTier {
    /// A catalog device (`serrano sim roofline` lists them), or a what-if variant (`NEW=BASE,FIELD=xK`).
    pub device: Option<String>,
    /// Or a `serrano sim calibrate` profile file: a real server's step-time model.
    pub profile: Option<String>,
    /// The model the device is modelled running (a catalog model); default: the shape of
    /// the model that makes the tokens.
    pub model_shape: Option<String>,
    /// A device's weights and arithmetic (bf16 when not given).
    pub precision: Option<String>,
    /// Step limits (a device's default the datacenter's, a profile's the server's).
    pub max_num_seqs: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    #[serde(default)]
    pub tokens: SimTokens,
}

/// Where a `sim` backend's tokens come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SimTokens {
    /// The engine generates them; each is released no sooner than the device would have it.
    #[default]
    Engine,
    /// No model runs: every token is filler text, as many as `max_tokens` asks, released at
    /// the device's pace (a tier far faster than this machine, many streams at once).
    Synthetic,
}

/// Most sequences or tokens a `sim` backend's step may be given (the simulated device's own
/// limit on sequences is `serrano_sim::live::MAX_SEQUENCES`).
pub const MAX_SIM_STEP: usize = 1 << 20;

/// A tenant's latency class in a local engine's scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Admitted and prefilled first; its decodes keep the inter-token target.
    #[default]
    Interactive,
    /// Throughput first: deferred behind interactive work (within a bounded wait), preempted
    /// first.
    Batch,
}

/// A latency objective, on p95 estimates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Time to first token (for non-streamed requests: to the whole response).
    pub ttft_p95_ms: Option<f64>,
    /// Gap between streamed tokens.
    pub itl_p95_ms: Option<f64>,
}

/// Dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// `[routing]`: defaults for every route and tenant.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub strategy: Strategy,
    /// Further attempts on other eligible backends after a connect error, timeout or 5xx.
    pub retries: u32,
    /// First backoff before a retry; doubled each time, with jitter.
    pub backoff_ms: u64,
    /// A backend without a latency sample this recent counts as unknown (and so is tried
    /// again by `cheapest-within-slo`, which is how a recovered backend wins traffic back).
    pub stale_after_ms: u64,
    pub slo: Slo,
    /// Regions and tiers every tenant without its own list may use (absent: all).
    pub regions: Option<Vec<String>>,
    pub tiers: Option<Vec<String>>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            strategy: Strategy::Priority,
            retries: 2,
            backoff_ms: 25,
            stale_after_ms: 5_000,
            slo: Slo::default(),
            regions: None,
            tiers: None,
        }
    }
}

/// `[health]`: active health checks of remote backends (`GET {url}/models`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed checks after which a backend is down.
    pub failures_to_down: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval_ms: 1_000,
            timeout_ms: 1_000,
            failures_to_down: 2,
        }
    }
}

/// `[breaker]`: the circuit breaker of every backend.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    /// Opens when at least this share of the window's requests failed...
    pub failure_ratio: f64,
    /// ...and the window holds at least this many.
    pub min_requests: u32,
    pub window_ms: u64,
    /// How long it stays open before a probe (a request or a health check) may close it.
    pub cooldown_ms: u64,
    /// Also opens after this many failures in a row, however many successes the window holds
    /// (a backend that just died fails every request, while its good past fills the window).
    pub consecutive_failures: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            failure_ratio: 0.5,
            min_requests: 4,
            window_ms: 10_000,
            cooldown_ms: 3_000,
            consecutive_failures: 5,
        }
    }
}

/// `[[backend]]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    #[serde(default = "openai")]
    pub kind: Kind,
    /// Base URL including `/v1` (openai backends only).
    pub url: Option<String>,
    /// A GGUF file this process runs an engine of its own for (local and sim backends only;
    /// without it, the engine of `serrano serve --model`).
    pub model: Option<String>,
    /// What a `sim` backend's pace is modelled on (sim backends only).
    pub sim: Option<SimTier>,
    pub region: String,
    /// e.g. gpu, asic, cpu.
    pub tier: String,
    /// Model ids served under the same name.
    #[serde(default)]
    pub models: Vec<String>,
    /// Names clients use, mapped to the backend's own model id.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Absent: the store's price table (`serrano admin price`) is left as it is.
    pub price: Option<Price>,
    #[serde(default = "max_concurrency")]
    pub max_concurrency: u32,
    /// Whole-request limit (default: the server's --request-timeout).
    pub timeout_ms: Option<u64>,
    #[serde(default = "connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Environment variable holding the backend's API key (never the key itself).
    pub api_key_env: Option<String>,
    /// Share for the `weighted` strategy when a route gives no weights.
    #[serde(default = "one")]
    pub weight: u32,
    /// The models' context length, when the backend does not report `max_model_len`.
    pub context_length: Option<u64>,
    /// `max_tokens` put into requests without one, so the reservation bounds the output.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
}

/// What is wrong with a sim table, and in which field: its names and sizes (the device, the
/// profile and the precision are checked where the backend is built, against the catalog).
fn check_sim(t: &SimTier) -> Result<(), (&'static str, String)> {
    match (&t.device, &t.profile) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(("device", "give one of device or profile".into()))
        }
        _ => {}
    }
    let strings = [
        ("device", &t.device),
        ("profile", &t.profile),
        ("model_shape", &t.model_shape),
        ("precision", &t.precision),
    ];
    for (field, v) in strings {
        if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 4096) {
            return Err((field, "1 to 4,096 bytes".into()));
        }
    }
    for (field, v) in [
        ("max_num_seqs", t.max_num_seqs),
        ("max_batch_tokens", t.max_batch_tokens),
    ] {
        if v.is_some_and(|v| v == 0 || v > MAX_SIM_STEP) {
            return Err((field, format!("from 1 to {MAX_SIM_STEP}")));
        }
    }
    Ok(())
}

fn openai() -> Kind {
    Kind::Openai
}
fn max_concurrency() -> u32 {
    256
}
fn connect_timeout_ms() -> u64 {
    2_000
}
fn one() -> u32 {
    1
}
fn default_max_tokens() -> u64 {
    4096
}

impl Backend {
    /// The in-process engine, serving every model name it was started with.
    pub fn local(region: &str) -> Backend {
        Backend {
            name: "local".into(),
            kind: Kind::Local,
            url: None,
            model: None,
            sim: None,
            region: region.into(),
            tier: "cpu".into(),
            models: vec![],
            aliases: BTreeMap::new(),
            price: None,
            max_concurrency: max_concurrency(),
            timeout_ms: None,
            connect_timeout_ms: connect_timeout_ms(),
            api_key_env: None,
            weight: one(),
            context_length: None,
            default_max_tokens: default_max_tokens(),
        }
    }

    /// An OpenAI-compatible server.
    pub fn openai(name: &str, url: &str, region: &str, models: Vec<String>) -> Backend {
        Backend {
            name: name.into(),
            kind: Kind::Openai,
            url: Some(url.into()),
            tier: "remote".into(),
            models,
            ..Backend::local(region)
        }
    }

    /// A simulated device in front of the in-process engine.
    pub fn sim(name: &str, region: &str, sim: SimTier) -> Backend {
        Backend {
            name: name.into(),
            kind: Kind::Sim,
            tier: "sim".into(),
            sim: Some(sim),
            ..Backend::local(region)
        }
    }

    /// The backend's id for a client's model name, if it serves it.
    pub fn serves(&self, model: &str) -> Option<&str> {
        if let Some(m) = self.aliases.get(model) {
            return Some(m);
        }
        self.models
            .iter()
            .find(|m| m.as_str() == model)
            .map(String::as_str)
    }

    /// Every name a client may use for this backend's models.
    pub fn client_models(&self) -> impl Iterator<Item = &str> {
        self.models
            .iter()
            .chain(self.aliases.keys())
            .map(String::as_str)
    }
}

/// `[[route]]`: how one model (or `*`, every other model) is routed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub model: String,
    pub strategy: Option<Strategy>,
    /// Candidates in priority order (default: every backend serving the model, in file order).
    #[serde(default)]
    pub backends: Vec<String>,
    /// Shares for `weighted`, by backend name (default: each backend's `weight`).
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    pub slo: Option<Slo>,
}

/// `[tenant.NAME]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Data residency: never routed to a backend outside these regions, not even in fallback.
    pub regions: Option<Vec<String>>,
    pub tiers: Option<Vec<String>>,
    pub slo: Option<Slo>,
    /// Its latency class in local engines (default interactive).
    pub class: Option<Class>,
    /// The tenant's safety filters, applied to the governance store with the config.
    pub filters: Option<serrano_safety::Policy>,
    /// Each traced request of the tenant on a local engine gets an event per token (default
    /// false; a request can ask with `x-serrano-trace-tokens: true`).
    pub trace_tokens: Option<bool>,
}

/// `[[price]]`: a price for one model on one backend, overriding the backend's `price`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub model: String,
    pub backend: String,
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    routing: Routing,
    #[serde(default)]
    health: Health,
    #[serde(default)]
    breaker: Breaker,
    #[serde(default)]
    backend: Vec<Spanned<Backend>>,
    #[serde(default)]
    route: Vec<Spanned<Route>>,
    #[serde(default)]
    tenant: BTreeMap<String, Spanned<Tenant>>,
    #[serde(default)]
    price: Vec<Spanned<PriceEntry>>,
    #[serde(default)]
    mcp_server: Vec<Spanned<McpServer>>,
}

/// `[[mcp_server]]`: an MCP server the gateway at `/mcp` fronts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McpServer {
    pub name: String,
    /// Its Streamable HTTP endpoint (`url`), or a program that speaks MCP on stdin/stdout.
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub region: String,
    /// Environment variable holding its API key (sent as a bearer token; url servers only).
    pub api_key_env: Option<String>,
    /// Tenants that may use it (default: every tenant).
    pub tenants: Option<Vec<String>>,
    /// Tools it offers that may be used (default: all); `deny_tools` wins over it.
    pub allow_tools: Option<Vec<String>>,
    #[serde(default)]
    pub deny_tools: Vec<String>,
}

impl McpServer {
    /// Whether `tenant` may use this server's `tool`: listed tenants, then allow and deny.
    pub fn permits(&self, tenant: &str, tool: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tenant))
            && self
                .allow_tools
                .as_ref()
                .is_none_or(|a| a.iter().any(|x| x == tool))
            && !self.deny_tools.iter().any(|x| x == tool)
    }
}

/// A parsed, validated config and the exact text it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub routing: Routing,
    pub health: Health,
    pub breaker: Breaker,
    pub backends: Vec<Backend>,
    pub routes: Vec<Route>,
    pub tenants: BTreeMap<String, Tenant>,
    pub prices: Vec<PriceEntry>,
    pub mcp_servers: Vec<McpServer>,
    /// The TOML text, stored verbatim as the version's content.
    #[serde(skip)]
    pub source: String,
    /// sha256 of `source`.
    pub hash: String,
}

/// A precise config error: where, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = String::new();
        if let Some(l) = self.line {
            out.push_str(&format!("line {l}"));
            if let Some(c) = self.column {
                out.push_str(&format!(", column {c}"));
            }
            out.push_str(": ");
        }
        if let Some(f) = &self.field {
            out.push_str(&format!("{f}: "));
        }
        out.push_str(&self.message);
        out
    }
}

impl Config {
    pub fn parse(source: &str) -> Result<Config, ConfigError> {
        if source.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError {
                line: None,
                column: None,
                field: None,
                message: format!("the config is larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let raw: Raw = toml::from_str(source).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(source, s.start))
                .map_or((None, None), |(l, c)| (Some(l), Some(c)));
            ConfigError {
                line,
                column,
                field: e.span().and_then(|s| field_at(source, s.start)),
                message: e.message().trim().to_string(),
            }
        })?;
        let v = Validator { source };
        v.check(&raw)?;
        Ok(Config {
            routing: raw.routing,
            health: raw.health,
            breaker: raw.breaker,
            backends: raw.backend.into_iter().map(Spanned::into_inner).collect(),
            routes: raw.route.into_iter().map(Spanned::into_inner).collect(),
            tenants: raw
                .tenant
                .into_iter()
                .map(|(k, v)| (k, v.into_inner()))
                .collect(),
            prices: raw.price.into_iter().map(Spanned::into_inner).collect(),
            mcp_servers: raw
                .mcp_server
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            hash: sha256_hex(source),
            source: source.to_string(),
        })
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The route of a model: its own, else the `*` route, else none (every backend serving
    /// it, with the default strategy).
    pub fn route_for(&self, model: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.model == model)
            .or_else(|| self.routes.iter().find(|r| r.model == "*"))
    }

    /// Each backend's price per model in dollars per 1M tokens, overrides applied.
    pub fn price_table(&self) -> Vec<PriceEntry> {
        let mut out: Vec<PriceEntry> = Vec::new();
        for b in &self.backends {
            for m in b.client_models() {
                let p = self
                    .prices
                    .iter()
                    .find(|p| p.backend == b.name && p.model == m)
                    .map(|p| Price {
                        input: p.input,
                        output: p.output,
                    })
                    .or(b.price);
                let Some(p) = p else { continue };
                out.push(PriceEntry {
                    model: m.to_string(),
                    backend: b.name.clone(),
                    input: p.input,
                    output: p.output,
                });
            }
        }
        out
    }

    /// The regions a tenant may be served in (`None`: any).
    pub fn tenant_regions(&self, tenant: &str) -> Option<&[String]> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.regions.as_deref())
            .or(self.routing.regions.as_deref())
    }

    /// Environment variables that hold the backends' and MCP servers' keys and are not set here.
    pub fn missing_secrets(&self) -> Vec<String> {
        self.backends
            .iter()
            .filter_map(|b| b.api_key_env.clone())
            .chain(
                self.mcp_servers
                    .iter()
                    .filter_map(|m| m.api_key_env.clone()),
            )
            .filter(|v| std::env::var_os(v).is_none())
            .collect()
    }
}

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A config declaring just these backends (what the command-line flags describe).
pub fn render(backends: &[Backend]) -> String {
    #[derive(Serialize)]
    struct Only<'a> {
        backend: &'a [Backend],
    }
    let body = toml::to_string(&Only { backend: backends }).unwrap_or_default();
    format!("# Generated from the command line; pass --config FILE to route by policy.\n\n{body}")
}

/// A unified line diff of two configs' texts.
pub fn diff(a: &str, b: &str, a_name: &str, b_name: &str) -> String {
    similar::TextDiff::from_lines(a, b)
        .unified_diff()
        .context_radius(3)
        .header(a_name, b_name)
        .to_string()
}

/// 1-based line and column of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The dotted path of the key at `offset` (`backend[1].region`), from the table headers above
/// it; `None` when the offset is not on a `key = value` line.
fn field_at(source: &str, offset: usize) -> Option<String> {
    let mut table = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut pos = 0;
    for line in source.split_inclusive('\n') {
        let t = line.trim();
        let end = pos + line.len();
        if let Some(h) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let h = h.trim().to_string();
            let i = counts.entry(h.clone()).and_modify(|c| *c += 1).or_insert(0);
            table = format!("{h}[{i}]");
        } else if let Some(h) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = h.trim().to_string();
        }
        if offset < end {
            let key = t.split('=').next()?.trim().trim_matches('"');
            if !t.contains('=') || key.is_empty() {
                return (!table.is_empty()).then_some(table);
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        pos = end;
    }
    None
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn valid_price(p: f64) -> bool {
    p.is_finite() && (0.0..1e6).contains(&p)
}

struct Validator<'a> {
    source: &'a str,
}

impl Validator<'_> {
    /// An error in a table: at the line of its `field = ...` when the table has one, else at
    /// the table's header.
    fn err(
        &self,
        at: Option<std::ops::Range<usize>>,
        field: String,
        message: String,
    ) -> ConfigError {
        let key = field.rsplit('.').next().unwrap_or_default();
        let pos = at.map(|s| {
            // A table's span is its header; its fields run to the next header.
            let text = self.source.get(s.start..).unwrap_or_default();
            let mut off = 0;
            for (n, line) in text.split_inclusive('\n').enumerate() {
                let t = line.trim_start();
                if n > 0 && t.starts_with('[') {
                    break;
                }
                if t.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
                {
                    return s.start + off + (line.len() - t.len());
                }
                off += line.len();
            }
            s.start
        });
        let (line, column) = pos
            .map(|p| line_col(self.source, p))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        ConfigError {
            line,
            column,
            field: Some(field),
            message,
        }
    }

    fn check_mcp_servers(&self, raw: &Raw) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, m) in raw.mcp_server.iter().enumerate() {
            let span = Some(m.span());
            let f = |field: &str| format!("mcp_server[{i}].{field}");
            let m = m.get_ref();
            let e = |field: &str, msg: String| Err(self.err(span.clone(), f(field), msg));
            // `__` joins a server's name and a tool's in the names clients see.
            if !valid_name(&m.name) || m.name.contains("__") || m.name.contains('.') {
                return e(
                    "name",
                    "1 to 64 characters of [A-Za-z0-9_-], without '__'".into(),
                );
            }
            if !names.insert(m.name.as_str()) {
                return e("name", format!("'{}' is declared twice", m.name));
            }
            if !valid_name(&m.region) {
                return e("region", "1 to 64 characters of [A-Za-z0-9._-]".into());
            }
            match (&m.url, &m.command) {
                (Some(u), None) if u.starts_with("http://") || u.starts_with("https://") => {}
                (Some(u), None) => return e("url", format!("'{u}' is not an http(s) URL")),
                (None, Some(c)) if !c.is_empty() => {}
                (None, Some(_)) => {
                    return e("command", "the program to run, then its arguments".into())
                }
                _ => return e("url", "exactly one of url or command".into()),
            }
            if let Some(v) = &m.api_key_env {
                if m.url.is_none() || !valid_env_name(v) {
                    return e(
                        "api_key_env",
                        "the name of an environment variable, for a url server".into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn check(&self, raw: &Raw) -> Result<(), ConfigError> {
        self.check_globals(raw)?;
        self.check_mcp_servers(raw)?;
        if raw.backend.len() > MAX_BACKENDS {
            return Err(self.err(
                None,
                "backend".into(),
                format!("at most {MAX_BACKENDS} backends"),
            ));
        }
        let mut names = HashSet::new();
        let mut locals = 0;
        let mut paths = HashSet::new();
        for (i, b) in raw.backend.iter().enumerate() {
            let span = Some(b.span());
            let f = |field: &str| format!("backend[{i}].{field}");
            let b = b.get_ref();
            self.check_backend(b, &span, &f)?;
            if !names.insert(b.name.as_str()) {
                return Err(self.err(span, f("name"), format!("'{}' is declared twice", b.name)));
            }
            locals += usize::from(b.kind == Kind::Local && b.model.is_none());
            // A sim backend shares the engine of its model path with any other backend.
            let own_model = b.model.as_ref().filter(|_| b.kind == Kind::Local);
            if locals > 1 {
                return Err(self.err(
                    span,
                    f("kind"),
                    "at most one local backend without a model (the --model engine); give the others a model path".into(),
                ));
            }
            if let Some(p) = own_model {
                if !paths.insert(p.as_str()) {
                    return Err(self.err(
                        span,
                        f("model"),
                        format!("'{p}' is served by another local backend already"),
                    ));
                }
            }
        }
        let regions: HashSet<&str> = raw
            .backend
            .iter()
            .map(|b| b.get_ref().region.as_str())
            .chain(raw.mcp_server.iter().map(|m| m.get_ref().region.as_str()))
            .collect();
        let tiers: HashSet<&str> = raw
            .backend
            .iter()
            .map(|b| b.get_ref().tier.as_str())
            .collect();
        let known = |list: &Option<Vec<String>>, set: &HashSet<&str>, what: &str| {
            for r in list.iter().flatten() {
                if !set.contains(r.as_str()) {
                    let whose = if what == "region" {
                        "backend's or MCP server's"
                    } else {
                        "backend's"
                    };
                    return Err(format!("{what} '{r}' is not any {whose} {what}"));
                }
            }
            Ok(())
        };
        known(&raw.routing.regions, &regions, "region")
            .and_then(|_| known(&raw.routing.tiers, &tiers, "tier"))
            .map_err(|m| self.err(None, "routing".into(), m))?;
        let mut routed = HashSet::new();
        for (i, r) in raw.route.iter().enumerate() {
            let span = Some(r.span());
            let f = |field: &str| format!("route[{i}].{field}");
            let r = r.get_ref();
            if !routed.insert(r.model.as_str()) {
                return Err(self.err(span, f("model"), format!("'{}' is routed twice", r.model)));
            }
            self.check_route(raw, r, &span, &f)?;
        }
        for (name, t) in &raw.tenant {
            let span = Some(t.span());
            let f = |field: &str| format!("tenant.{name}.{field}");
            if !valid_name(name) {
                return Err(self.err(
                    span,
                    format!("tenant.{name}"),
                    "a tenant name is 1 to 64 characters of [A-Za-z0-9._-]".into(),
                ));
            }
            let t = t.get_ref();
            known(&t.regions, &regions, "region")
                .map_err(|m| self.err(span.clone(), f("regions"), m))?;
            known(&t.tiers, &tiers, "tier").map_err(|m| self.err(span.clone(), f("tiers"), m))?;
            if let Some(s) = &t.slo {
                self.check_slo(s, &span, &f("slo"))?;
            }
            if let Some(p) = &t.filters {
                serrano_safety::Filter::new(p.clone())
                    .map_err(|e| self.err(span.clone(), f("filters"), e.to_string()))?;
            }
        }
        for (i, p) in raw.price.iter().enumerate() {
            let span = Some(p.span());
            let f = |field: &str| format!("price[{i}].{field}");
            let p = p.get_ref();
            let Some(b) = raw
                .backend
                .iter()
                .map(|b| b.get_ref())
                .find(|b| b.name == p.backend)
            else {
                return Err(self.err(span, f("backend"), format!("no backend '{}'", p.backend)));
            };
            if b.serves(&p.model).is_none() {
                return Err(self.err(
                    span,
                    f("model"),
                    format!("backend '{}' does not serve '{}'", b.name, p.model),
                ));
            }
            if !valid_price(p.input) || !valid_price(p.output) {
                return Err(self.err(
                    span,
                    f("input"),
                    "prices are dollars per 1M tokens, from 0 to 1,000,000".into(),
                ));
            }
        }
        Ok(())
    }

    fn check_globals(&self, raw: &Raw) -> Result<(), ConfigError> {
        let r = &raw.routing;
        if r.retries > 8 {
            return Err(self.err(None, "routing.retries".into(), "at most 8".into()));
        }
        if r.backoff_ms > 10_000 {
            return Err(self.err(None, "routing.backoff_ms".into(), "at most 10000".into()));
        }
        self.check_slo(&r.slo, &None, "routing.slo")?;
        let h = &raw.health;
        if h.interval_ms < 50 || h.timeout_ms == 0 || h.failures_to_down == 0 {
            return Err(self.err(
                None,
                "health".into(),
                "interval_ms >= 50, timeout_ms >= 1 and failures_to_down >= 1".into(),
            ));
        }
        let b = &raw.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0)
            || b.min_requests == 0
            || b.consecutive_failures == 0
        {
            return Err(self.err(
                None,
                "breaker".into(),
                "failure_ratio in (0, 1], min_requests >= 1 and consecutive_failures >= 1".into(),
            ));
        }
        Ok(())
    }

    fn check_slo(
        &self,
        s: &Slo,
        span: &Option<std::ops::Range<usize>>,
        field: &str,
    ) -> Result<(), ConfigError> {
        for v in [s.ttft_p95_ms, s.itl_p95_ms].into_iter().flatten() {
            if !(v.is_finite() && v > 0.0) {
                return Err(self.err(
                    span.clone(),
                    field.to_string(),
                    "SLO targets are positive milliseconds".into(),
                ));
            }
        }
        Ok(())
    }

    fn check_backend(
        &self,
        b: &Backend,
        span: &Option<std::ops::Range<usize>>,
        f: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let e = |field: &str, m: String| Err(self.err(span.clone(), f(field), m));
        if !valid_name(&b.name) {
            return e("name", "1 to 64 characters of [A-Za-z0-9._-]".into());
        }
        for (field, v) in [("region", &b.region), ("tier", &b.tier)] {
            if !valid_name(v) {
                return e(field, "1 to 64 characters of [A-Za-z0-9._-]".into());
            }
        }
        match (b.kind, &b.url) {
            (Kind::Openai, None) => return e("url", "an openai backend needs a url".into()),
            (Kind::Openai, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return e("url", format!("'{u}' is not an http(s) URL"))
            }
            (Kind::Local | Kind::Sim, Some(_)) => {
                return e("url", format!("a {} backend has no url", b.kind.as_str()))
            }
            _ => {}
        }
        match (b.kind, &b.model) {
            (Kind::Openai, Some(_)) => return e(
                "model",
                "only a local or sim backend runs a model file; an openai backend lists `models`"
                    .into(),
            ),
            (Kind::Local | Kind::Sim, Some(p)) if p.is_empty() || p.len() > 4096 => {
                return e("model", "a path to a GGUF file".into())
            }
            _ => {}
        }
        match (b.kind, &b.sim) {
            (Kind::Sim, None) => {
                return e(
                    "sim",
                    "a sim backend needs sim = { device = \"...\" } or { profile = \"...\" }"
                        .into(),
                )
            }
            (Kind::Sim, Some(t)) => {
                if let Err((field, m)) = check_sim(t) {
                    return e(&format!("sim.{field}"), m);
                }
            }
            (_, Some(_)) => return e("sim", "only a sim backend has a sim table".into()),
            (_, None) => {}
        }
        if b.kind == Kind::Openai && b.models.is_empty() && b.aliases.is_empty() {
            return e("models", "list the models this backend serves".into());
        }
        if let Some(v) = &b.api_key_env {
            if b.kind != Kind::Openai {
                return e(
                    "api_key_env",
                    format!("a {} backend has no key", b.kind.as_str()),
                );
            }
            if !valid_env_name(v) {
                return e(
                    "api_key_env",
                    format!("'{v}' is not an environment variable name (the key itself never goes in the config)"),
                );
            }
        }
        if b.price
            .is_some_and(|p| !valid_price(p.input) || !valid_price(p.output))
        {
            return e(
                "price",
                "prices are dollars per 1M tokens, from 0 to 1,000,000".into(),
            );
        }
        if b.max_concurrency == 0 {
            return e("max_concurrency", "at least 1".into());
        }
        if b.timeout_ms == Some(0) || b.connect_timeout_ms == 0 {
            return e("timeout_ms", "timeouts are positive".into());
        }
        if b.context_length == Some(0) || b.default_max_tokens == 0 {
            return e("context_length", "positive".into());
        }
        Ok(())
    }

    fn check_route(
        &self,
        raw: &Raw,
        r: &Route,
        span: &Option<std::ops::Range<usize>>,
        f: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let e = |field: &str, m: String| Err(self.err(span.clone(), f(field), m));
        if r.model.is_empty() {
            return e(
                "model",
                "a model name, or \"*\" for every other model".into(),
            );
        }
        let by_name = |n: &str| {
            raw.backend
                .iter()
                .map(|b| b.get_ref())
                .find(|b| b.name == n)
        };
        for n in &r.backends {
            let Some(b) = by_name(n) else {
                return e("backends", format!("no backend '{n}'"));
            };
            if r.model != "*" && b.serves(&r.model).is_none() {
                return e(
                    "backends",
                    format!("backend '{n}' does not serve '{}'", r.model),
                );
            }
        }
        for n in r.weights.keys() {
            if by_name(n).is_none() {
                return e("weights", format!("no backend '{n}'"));
            }
            if !r.backends.is_empty() && !r.backends.contains(n) {
                return e(
                    "weights",
                    format!("'{n}' is not among the route's backends"),
                );
            }
        }
        if r.model != "*"
            && !raw
                .backend
                .iter()
                .any(|b| b.get_ref().serves(&r.model).is_some())
        {
            return e("model", format!("no backend serves '{}'", r.model));
        }
        if r.strategy == Some(Strategy::Weighted)
            && !r.weights.is_empty()
            && r.weights.values().all(|&w| w == 0)
        {
            return e("weights", "at least one weight above 0".into());
        }
        if let Some(s) = &r.slo {
            self.check_slo(s, span, &f("slo"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[routing]
strategy = "priority"

[[backend]]
name = "eu-gpu"
url = "http://127.0.0.1:1/v1"
region = "eu"
tier = "gpu"
models = ["smollm2"]
price = { input = 0.2, output = 0.8 }

[[backend]]
name = "us-cpu"
url = "http://127.0.0.1:2/v1"
region = "us"
tier = "cpu"
aliases = { smollm2 = "SmolLM2-135M" }
api_key_env = "US_KEY"

[[route]]
model = "smollm2"
strategy = "weighted"
weights = { eu-gpu = 10, us-cpu = 90 }

[tenant.acme]
regions = ["eu"]
filters = { pii = "redact" }
"#;

    #[test]
    fn a_good_config_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].serves("smollm2"), Some("SmolLM2-135M"));
        assert_eq!(c.route_for("smollm2").unwrap().weights["us-cpu"], 90);
        assert_eq!(
            c.tenants["acme"].regions.as_deref(),
            Some(&["eu".to_string()][..])
        );
        assert_eq!(
            c.price_table().len(),
            1,
            "us-cpu has no price: the store's stays"
        );
        assert_eq!(c.hash.len(), 64);
    }

    fn error_of(text: &str) -> ConfigError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn syntax_and_schema_errors_name_line_and_field() {
        let e = error_of(&GOOD.replace("region = \"us\"", "regoin = \"us\""));
        assert_eq!(e.line, Some(16), "{e}");
        assert_eq!(e.field.as_deref(), Some("backend[1].regoin"), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");

        let e = error_of(&GOOD.replace("tier = \"gpu\"", "tier = gpu"));
        assert_eq!(e.line, Some(9), "{e}");
        assert_eq!(e.field.as_deref(), Some("backend[0].tier"), "{e}");

        let e = error_of(&GOOD.replace("\"weighted\"", "\"fastest\""));
        assert_eq!(e.field.as_deref(), Some("route[0].strategy"), "{e}");
    }

    #[test]
    fn a_sim_backend_needs_one_device_or_profile_and_nothing_remote() {
        let sim = |table: &str| {
            format!(
                "[[backend]]\nname = \"asic\"\nkind = \"sim\"\nregion = \"eu\"\ntier = \"asic\"\n{table}\n"
            )
        };
        let c = Config::parse(&sim(
            "sim = { device = \"inference-asic\", model_shape = \"llama-3.1-8b\", tokens = \"synthetic\" }",
        ))
        .unwrap();
        let t = c.backends[0].sim.as_ref().unwrap();
        assert_eq!(t.device.as_deref(), Some("inference-asic"));
        assert_eq!(t.tokens, SimTokens::Synthetic);
        assert_eq!(c.backends[0].kind.as_str(), "sim");
        // A rendered config of a sim backend reads back the same.
        let back = Config::parse(&render(&c.backends)).unwrap();
        assert_eq!(back.backends, c.backends);

        let refused = [
            ("", "backend[0].sim", "needs sim"),
            (
                "sim = {}",
                "backend[0].sim.device",
                "one of device or profile",
            ),
            (
                "sim = { device = \"a\", profile = \"p.toml\" }",
                "backend[0].sim.device",
                "one of device or profile",
            ),
            (
                "sim = { device = \"a\", max_num_seqs = 0 }",
                "backend[0].sim.max_num_seqs",
                "from 1",
            ),
            (
                "sim = { device = \"a\" }\nurl = \"http://x/v1\"",
                "backend[0].url",
                "no url",
            ),
            (
                "sim = { device = \"a\" }\napi_key_env = \"K\"",
                "backend[0].api_key_env",
                "no key",
            ),
            (
                "sim = { device = \"a\", tokens = \"random\" }",
                "backend[0].sim",
                "unknown variant",
            ),
        ];
        for (table, field, message) in refused {
            let e = error_of(&sim(table));
            assert_eq!(e.field.as_deref(), Some(field), "{table}: {e}");
            assert!(e.message.contains(message), "{table}: {e}");
        }
        let e = error_of(&GOOD.replace(
            "tier = \"gpu\"",
            "tier = \"gpu\"\nsim = { device = \"h100-sxm\" }",
        ));
        assert_eq!(e.field.as_deref(), Some("backend[0].sim"), "{e}");
        assert!(e.message.contains("only a sim backend"), "{e}");
    }

    #[test]
    fn semantic_errors_name_line_and_field() {
        let e = error_of(&GOOD.replace("eu-gpu = 10", "eu-gpux = 10"));
        assert_eq!(e.field.as_deref(), Some("route[0].weights"), "{e}");
        assert_eq!(e.line, Some(24), "{e}");
        assert!(e.message.contains("eu-gpux"));

        let e = error_of(&GOOD.replace("regions = [\"eu\"]", "regions = [\"ue\"]"));
        assert_eq!(e.field.as_deref(), Some("tenant.acme.regions"), "{e}");
        assert!(e.message.contains("'ue'"), "{e}");

        let e = error_of(&GOOD.replace("\"US_KEY\"", "\"sk-live-123\""));
        assert_eq!(e.field.as_deref(), Some("backend[1].api_key_env"), "{e}");

        let e = error_of(&GOOD.replace("name = \"us-cpu\"", "name = \"eu-gpu\""));
        assert!(e.message.contains("declared twice"), "{e}");

        let e = error_of(&GOOD.replace("pii = \"redact\"", "pii = \"shred\""));
        assert!(
            e.field.as_deref().unwrap().starts_with("tenant.acme"),
            "{e}"
        );
    }

    const MCP: &str = r#"
[[mcp_server]]
name = "tools"
url = "http://127.0.0.1:3/mcp"
region = "apac"
api_key_env = "TOOLS_KEY"
tenants = ["acme"]
allow_tools = ["add", "echo"]
deny_tools = ["echo"]
"#;

    #[test]
    fn mcp_servers_parse_and_permit_per_tenant_and_tool() {
        let c = Config::parse(&format!("{GOOD}{MCP}")).unwrap();
        let m = &c.mcp_servers[0];
        assert!(m.permits("acme", "add"));
        assert!(!m.permits("acme", "echo"), "deny wins over allow");
        assert!(!m.permits("acme", "rm"), "not in allow_tools");
        assert!(!m.permits("beta", "add"), "not a listed tenant");
        // A tenant may be kept to an MCP server's region.
        let c = Config::parse(&format!("{GOOD}{MCP}").replace("[\"eu\"]", "[\"apac\"]"));
        assert!(c.is_ok(), "{c:?}");
        assert!(c
            .unwrap()
            .missing_secrets()
            .contains(&"TOOLS_KEY".to_string()));
    }

    #[test]
    fn mcp_server_errors_name_the_field() {
        let bad = |from: &str, to: &str| error_of(&format!("{GOOD}{MCP}").replace(from, to));
        let e = bad("name = \"tools\"", "name = \"my__tools\"");
        assert_eq!(e.field.as_deref(), Some("mcp_server[0].name"), "{e}");
        let e = bad("url = \"http", "url = \"file");
        assert_eq!(e.field.as_deref(), Some("mcp_server[0].url"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:3/mcp\"",
            "url = \"http://x\"\ncommand = [\"x\"]",
        );
        assert!(e.message.contains("exactly one"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:3/mcp\"",
            "command = [\"tools\", \"--stdio\"]",
        );
        assert_eq!(e.field.as_deref(), Some("mcp_server[0].api_key_env"), "{e}");
        let e = bad("deny_tools", "deny_tool");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = error_of(&format!("{GOOD}{MCP}{MCP}"));
        assert!(e.message.contains("declared twice"), "{e}");
    }

    #[test]
    fn rendered_backends_parse_back() {
        let c = Config::parse(GOOD).unwrap();
        let text = render(&c.backends);
        assert_eq!(Config::parse(&text).unwrap().backends, c.backends, "{text}");
    }

    #[test]
    fn diffs_are_unified() {
        let d = diff("a = 1\nb = 2\n", "a = 1\nb = 3\n", "v1", "v2");
        assert!(d.contains("-b = 2") && d.contains("+b = 3"), "{d}");
    }
}
