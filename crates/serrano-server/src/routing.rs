//! The front door's routing at runtime: applying config versions (validated, stored, then
//! switched to atomically), building each backend, active health checks, and per-backend
//! metrics. The decisions themselves are `serrano-router`'s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serrano_gov::{GovError, Governance, Retention};
use serrano_router::{Attempt, Config, ConfigError, Kind, Outcome, Router};

use crate::backend::Backend;
use crate::engines::LocalEngines;
use crate::error::ApiError;
use crate::local::LocalBackend;
use crate::upstream::Upstream;

/// How the server reaches a backend: whatever implements the seam.
pub type Handle = Arc<dyn Backend>;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Gov(#[from] GovError),
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> ApiError {
        match e {
            ApplyError::Config(c) => ApiError {
                param: c.field.clone(),
                code: Some("invalid_config".into()),
                ..ApiError::invalid(format!("invalid config: {c}"))
            },
            ApplyError::Invalid(m) => ApiError {
                code: Some("invalid_config".into()),
                ..ApiError::invalid(format!("invalid config: {m}"))
            },
            ApplyError::Gov(g) => g.into(),
        }
    }
}

type Labels = Vec<(String, String)>;

/// Per-backend metrics, named like the engine's under `serrano:`.
pub struct RoutingMetrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    spend_nusd: Family<Labels, Counter>,
    overhead: Histogram,
    breaker: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    healthy: Family<Labels, Gauge>,
    device_running: Family<Labels, Gauge>,
    device_waiting: Family<Labels, Gauge>,
    device_kv_usage: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    device_steps: Family<Labels, Gauge>,
    config_version: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

impl RoutingMetrics {
    fn new() -> RoutingMetrics {
        let mut registry = Registry::with_prefix("serrano");
        let m = RoutingMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            spend_nusd: Family::default(),
            overhead: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
            breaker: Family::default(),
            in_flight: Family::default(),
            healthy: Family::default(),
            device_running: Family::default(),
            device_waiting: Family::default(),
            device_kv_usage: Family::default(),
            device_steps: Family::default(),
            config_version: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "backend_requests",
            "Attempts sent to each backend, by outcome (ok, failed, refused)",
            m.requests.clone(),
        );
        registry.register(
            "backend_latency_seconds",
            "Time to first token from each backend (non-streamed: to the whole response)",
            m.latency.clone(),
        );
        registry.register(
            "backend_spend_nano_usd",
            "Cost charged for requests each backend served, in nano-dollars",
            m.spend_nusd.clone(),
        );
        registry.register(
            "gateway_added_latency_seconds",
            "Time a request spent in the gateway before its backend started (parsing, filters, routing, reservation; not failed attempts or backoff)",
            m.overhead.clone(),
        );
        registry.register(
            "backend_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            m.breaker.clone(),
        );
        registry.register(
            "backend_in_flight",
            "Requests in flight on each backend",
            m.in_flight.clone(),
        );
        registry.register(
            "backend_healthy",
            "1 while the backend's health checks pass",
            m.healthy.clone(),
        );
        registry.register(
            "backend_device_running",
            "Sequences running on a simulated device (kind = sim)",
            m.device_running.clone(),
        );
        registry.register(
            "backend_device_waiting",
            "Sequences waiting for admission on a simulated device",
            m.device_waiting.clone(),
        );
        registry.register(
            "backend_device_kv_usage",
            "Share of a simulated device's KV cache in use",
            m.device_kv_usage.clone(),
        );
        registry.register(
            "backend_device_steps",
            "Steps a simulated device has run since it started",
            m.device_steps.clone(),
        );
        registry.register(
            "config_version",
            "The routing config version this process applies",
            m.config_version.clone(),
        );
        RoutingMetrics { registry, ..m }
    }

    fn backend(name: &str) -> Labels {
        vec![("backend".into(), name.to_string())]
    }

    /// Ends an attempt and counts it.
    pub fn finish(&self, attempt: Attempt, outcome: Outcome, latency: Option<Duration>) {
        let name = attempt.backend().name.clone();
        let label = match outcome {
            Outcome::Ok { .. } => "ok",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        };
        attempt.finish(Instant::now(), outcome);
        let mut l = Self::backend(&name);
        l.push(("outcome".into(), label.into()));
        self.requests.get_or_create(&l).inc();
        if let (Outcome::Ok { .. }, Some(d)) = (outcome, latency) {
            self.latency
                .get_or_create(&Self::backend(&name))
                .observe(d.as_secs_f64());
        }
    }

    pub fn spent(&self, backend: &str, cost_nusd: i64) {
        if cost_nusd > 0 {
            self.spend_nusd
                .get_or_create(&Self::backend(backend))
                .inc_by(cost_nusd as u64);
        }
    }

    pub fn gateway_overhead(&self, d: Duration) {
        self.overhead.observe(d.as_secs_f64());
    }
}

/// The routing of one server process.
pub struct Routing {
    pub router: Router<Handle>,
    gov: Governance,
    engines: LocalEngines,
    request_timeout: Duration,
    /// One apply at a time, so versions switch in the order they were stored.
    applying: tokio::sync::Mutex<()>,
    pub metrics: RoutingMetrics,
}

impl Routing {
    /// Applies the first config (`author` says where it came from) and starts health checks.
    pub async fn start(
        gov: Governance,
        text: &str,
        author: &str,
        engines: LocalEngines,
        request_timeout: Duration,
    ) -> Result<Arc<Routing>, ApplyError> {
        let (config, handles) = prepare(text, &engines, request_timeout).await?;
        let version = store(&gov, &config, None, author, "apply").await?;
        let metrics = RoutingMetrics::new();
        metrics.config_version.set(version as i64);
        let routing = Arc::new(Routing {
            router: Router::new(version, config, handles),
            gov,
            engines,
            request_timeout,
            applying: tokio::sync::Mutex::new(()),
            metrics,
        });
        spawn_health_checks(Arc::downgrade(&routing));
        Ok(routing)
    }

    /// Validates a config, stores it as a version (its text, once), applies its prices and
    /// filters, then switches to it. An invalid config changes nothing; requests already routed
    /// finish on the version that routed them.
    pub async fn apply(&self, text: &str, author: &str, action: &str) -> Result<u64, ApplyError> {
        let _one = self.applying.lock().await;
        let (config, handles) = prepare(text, &self.engines, self.request_timeout).await?;
        let old = self.router.active().config.clone();
        let version = store(&self.gov, &config, Some(&old), author, action).await?;
        self.engines.retain(&model_paths(&config));
        self.router.install(version, config, handles);
        self.metrics.config_version.set(version as i64);
        tracing::info!(version, author, action, "routing config applied");
        Ok(version)
    }

    /// Applies a stored version again.
    pub async fn rollback(&self, version: u64, author: &str) -> Result<u64, ApplyError> {
        let v = self.gov.config_version(version).await?;
        let text = v.source.unwrap_or_default();
        self.apply(&text, author, "rollback").await
    }

    /// The in-process engine serving `model` (the first local backend's when `None`): 404 when
    /// no local backend serves it, or this process has none.
    pub fn local_engine(
        &self,
        model: Option<&str>,
    ) -> Result<serrano_engine::EngineHandle, ApiError> {
        let dep = self.router.active();
        let mut locals = dep
            .config
            .backends
            .iter()
            .zip(&dep.handles)
            .filter_map(|(b, h)| Some((b, h.engine()?)));
        let found = match model {
            None => locals.next(),
            Some(m) => locals.find(|(b, _)| b.serves(m).is_some()),
        };
        match (found, model) {
            (Some((_, e)), _) => Ok(e.clone()),
            (None, Some(m)) if dep.handles.iter().any(|h| h.engine().is_some()) => {
                Err(ApiError::model_not_found(m))
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "This server has no local model (it is a gateway); this route needs one",
            )),
        }
    }

    /// Every distinct engine of the active config's local backends.
    pub fn engines(&self) -> Vec<serrano_engine::EngineHandle> {
        let dep = self.router.active();
        let mut out: Vec<serrano_engine::EngineHandle> = Vec::new();
        for e in dep.handles.iter().filter_map(|h| h.engine()) {
            if !out.iter().any(|o| Arc::ptr_eq(o.info(), e.info())) {
                out.push(e.clone());
            }
        }
        out
    }

    /// Prometheus text of the routing metrics (without the `# EOF` line).
    pub fn encode_metrics(&self) -> String {
        let dep = self.router.active();
        for v in dep.views(Instant::now()) {
            let l = RoutingMetrics::backend(&v.name);
            let gauge = match v.breaker.as_str() {
                "closed" => 0,
                "half-open" => 1,
                _ => 2,
            };
            self.metrics.breaker.get_or_create(&l).set(gauge);
            self.metrics
                .in_flight
                .get_or_create(&l)
                .set(i64::from(v.in_flight));
            self.metrics
                .healthy
                .get_or_create(&l)
                .set(i64::from(v.healthy));
        }
        for (b, h) in dep.config.backends.iter().zip(&dep.handles) {
            let Some(load) = h.load() else { continue };
            let l = RoutingMetrics::backend(&b.name);
            let m = &self.metrics;
            let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            m.device_running.get_or_create(&l).set(int(load.running));
            m.device_waiting.get_or_create(&l).set(int(load.waiting));
            m.device_kv_usage.get_or_create(&l).set(load.kv_usage);
            let steps = i64::try_from(load.steps).unwrap_or(i64::MAX);
            m.device_steps.get_or_create(&l).set(steps);
        }
        let mut out = String::new();
        if encode(&mut out, &self.metrics.registry).is_err() {
            return String::new();
        }
        out.trim_end_matches("# EOF\n").to_string()
    }
}

/// The GGUF paths a config's local backends name.
fn model_paths(config: &Config) -> Vec<PathBuf> {
    config
        .backends
        .iter()
        .filter_map(|b| b.model.as_ref().map(PathBuf::from))
        .collect()
}

/// Parses and checks a config against this process, and builds each backend: an engine for a
/// local one (the `--model` engine, or one loaded from its `model` path), a client for a remote.
async fn prepare(
    text: &str,
    engines: &LocalEngines,
    request_timeout: Duration,
) -> Result<(Config, Vec<Handle>), ApplyError> {
    let mut config = Config::parse(text)?;
    let missing = config.missing_secrets();
    if !missing.is_empty() {
        return Err(ApplyError::Invalid(format!(
            "environment variable(s) {} not set in the server's environment",
            missing.join(", ")
        )));
    }
    let mut handles: Vec<Handle> = Vec::with_capacity(config.backends.len());
    for b in &mut config.backends {
        let name = b.name.clone();
        let invalid = |m: String| ApplyError::Invalid(format!("backend '{name}': {m}"));
        match b.kind {
            Kind::Local => {
                let engine = local_engine(b, engines).await.map_err(invalid)?;
                handles.push(Arc::new(LocalBackend::new(&b.name, engine)));
            }
            Kind::Openai => {
                let up = Upstream::from_backend(b, request_timeout).map_err(invalid)?;
                handles.push(Arc::new(up));
            }
            Kind::Sim => {
                let engine = local_engine(b, engines).await.map_err(invalid)?;
                handles.push(sim_backend(b, engine).map_err(invalid)?);
            }
        }
    }
    Ok((config, handles))
}

/// A sim backend: its device (the built-in catalog's, running the engine's model unless the
/// table names a `model_shape`; or a profile file, relative to the working directory) started
/// on its own thread, the engine rendering and making its tokens.
fn sim_backend(
    b: &serrano_router::config::Backend,
    engine: serrano_engine::EngineHandle,
) -> Result<Handle, String> {
    let tier = b.sim.clone().unwrap_or_default();
    let catalog = serrano_sim::Catalog::builtin().map_err(|e| e.to_string())?;
    let info = engine.info().clone();
    let mut shape = || {
        Ok(serrano_sim::ModelShape::from_config(
            &info.config,
            info.untied_head,
        ))
    };
    let (device, _) =
        serrano_sim::fleet::tier_backend(&tier, &catalog, &mut shape, std::path::Path::new("."))?;
    let device = serrano_sim::live::Device::start(&b.name, device).map_err(|e| e.to_string())?;
    let synthetic = tier.tokens == serrano_router::config::SimTokens::Synthetic;
    Ok(Arc::new(crate::simulated::SimBackend::new(
        &b.name, engine, device, synthetic,
    )))
}

/// The engine of a local backend, whose model names it fills in when the config gives none.
async fn local_engine(
    b: &mut serrano_router::config::Backend,
    engines: &LocalEngines,
) -> Result<serrano_engine::EngineHandle, String> {
    let Some(path) = b.model.clone() else {
        let Some((engine, names)) = engines.default_engine() else {
            return Err(
                "a local backend without 'model' serves this process's --model, and this process has none (a gateway)".into(),
            );
        };
        if b.models.is_empty() && b.aliases.is_empty() {
            b.models = names.clone();
        }
        if let Some(m) = b
            .models
            .iter()
            .chain(b.aliases.values())
            .find(|m| !names.contains(m))
        {
            return Err(format!("the local engine serves {names:?}, not '{m}'"));
        }
        return Ok(engine.clone());
    };
    let engine = engines
        .engine_for(std::path::Path::new(&path))
        .await
        .map_err(|e| format!("cannot load {path}: {e}"))?;
    if b.models.is_empty() && b.aliases.is_empty() {
        let stem = std::path::Path::new(&path)
            .file_name()
            .map(|f| f.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| path.clone());
        b.models = vec![stem];
    }
    Ok(engine)
}

/// Stores the version and writes what the config declares into the governance store: prices,
/// and the filters of its tenants (a tenant whose filters left the config loses them).
async fn store(
    gov: &Governance,
    config: &Config,
    old: Option<&Config>,
    author: &str,
    action: &str,
) -> Result<u64, ApplyError> {
    for p in config.price_table() {
        gov.set_price(&p.model, &p.backend, p.input, p.output)
            .await?;
    }
    for (name, t) in &config.tenants {
        let Some(f) = &t.filters else { continue };
        if gov.tenant(name).await.is_err() {
            gov.create_tenant(name, Retention::default()).await?;
        }
        let json = serde_json::to_string(f).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        gov.set_policy(name, Some(&json)).await?;
    }
    for (name, t) in old.map(|o| &o.tenants).into_iter().flatten() {
        let dropped =
            t.filters.is_some() && config.tenants.get(name).is_none_or(|n| n.filters.is_none());
        if dropped {
            gov.set_policy(name, None).await?;
        }
    }
    Ok(gov
        .record_config(&config.hash, &config.source, author, action)
        .await?)
}

/// Checks every remote backend of the active config every `health.interval_ms`
/// (`GET {url}/models`), feeding its health and breaker, and learning context lengths.
fn spawn_health_checks(routing: std::sync::Weak<Routing>) {
    tokio::spawn(async move {
        loop {
            let Some(r) = routing.upgrade() else { return };
            let dep = r.router.active();
            drop(r);
            let h = dep.config.health.clone();
            let checks = dep.handles.iter().zip(&dep.states).map(|(handle, state)| {
                let (backend, state) = (handle.clone(), state.clone());
                let timeout = Duration::from_millis(h.timeout_ms);
                async move {
                    let result = tokio::time::timeout(timeout, backend.health()).await;
                    let (ok, detail) = match result {
                        Ok(None) => return,
                        Ok(Some(Ok(()))) => (true, "ok".to_string()),
                        Ok(Some(Err(e))) => (false, e),
                        Err(_) => (false, format!("no answer in {} ms", h.timeout_ms)),
                    };
                    if !ok && !state.is_down() {
                        tracing::warn!(backend = %state.name, "health check failed: {detail}");
                    }
                    state.health_check(Instant::now(), ok, detail, h.failures_to_down);
                }
            });
            futures::future::join_all(checks).await;
            tokio::time::sleep(Duration::from_millis(h.interval_ms)).await;
        }
    });
}

/// 503 for a request no backend may take now; 404 for a model nobody serves.
pub fn route_error(e: serrano_router::RouteError) -> ApiError {
    match e {
        serrano_router::RouteError::UnknownModel(m) => ApiError::model_not_found(&m),
        serrano_router::RouteError::NoBackend(m) => ApiError {
            code: Some("no_backend_available".into()),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m)
        },
    }
}
