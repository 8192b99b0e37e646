//! serrano's OpenAI-compatible HTTP server (axum) around an [`EngineHandle`].
//!
//! Requests are parsed into the wire types of `serrano-api`, validated and translated into
//! engine requests here; the engine never sees HTTP. Every body has a size limit, every error is
//! an OpenAI-style JSON object, and accepted connections have TCP_NODELAY set.

mod admin;
mod error;
mod extract;
pub mod gov;
mod openai;
mod params;
pub mod routing;
pub mod safety;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serrano_engine::EngineHandle;
use serrano_gov::Governance;

pub use admin::budget_amount;
pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Names clients may use in `model`; the first is the one `/v1/models` lists first.
    pub model_names: Vec<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a generation may take, queueing included; past it the request is cancelled and
    /// answered 408 (or, mid-stream, ended with an error event).
    pub request_timeout: std::time::Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_names: vec!["default".into()],
            max_body_bytes: 4 << 20,
            request_timeout: std::time::Duration::from_secs(600),
        }
    }
}

/// Ways to authenticate besides API keys.
#[derive(Default, Clone)]
pub struct AuthConfig {
    /// Who a request without credentials is, when anonymous access is on.
    pub anonymous: Option<serrano_gov::Principal>,
    /// Verifies OIDC/JWT bearer tokens, when a JWKS is configured.
    pub jwt: Option<Arc<serrano_gov::JwtVerifier>>,
}

/// Where requests can go: the in-process engine and the routing over every backend (the local
/// one included, when the config declares it).
pub struct Backends {
    pub local: Option<EngineHandle>,
    pub routing: Arc<routing::Routing>,
}

pub struct AppState {
    pub engine: Option<EngineHandle>,
    pub routing: Arc<routing::Routing>,
    pub gov: Governance,
    pub auth: AuthConfig,
    pub config: ServerConfig,
    pub started: u64,
}

impl AppState {
    /// Resolves a `model` served by the local engine; a missing one means its default model.
    pub fn model_name(&self, requested: Option<&str>) -> Result<String, ApiError> {
        self.local()?;
        match requested {
            None | Some("") => Ok(self.config.model_names[0].clone()),
            Some(m) if self.config.model_names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// The routing decision for `model` (a missing one means the config's first model) and
    /// the principal's tenant.
    pub fn plan(
        &self,
        requested: Option<&str>,
        tenant: &str,
    ) -> Result<(String, serrano_router::Plan<routing::Handle>), ApiError> {
        let model = match requested.filter(|m| !m.is_empty()) {
            Some(m) => m.to_string(),
            None => self
                .routing
                .router
                .models()
                .into_iter()
                .next()
                .map(|(m, _)| m)
                .ok_or_else(|| ApiError::model_not_found(""))?,
        };
        let plan = self
            .routing
            .router
            .plan(&model, tenant, std::time::Instant::now())
            .map_err(routing::route_error)?;
        Ok((model, plan))
    }

    /// The local engine, or 404 on a gateway without one.
    pub fn local(&self) -> Result<&EngineHandle, ApiError> {
        self.engine.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "This server has no local model (it is a gateway); this route needs one",
            )
        })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The route table: every path the server answers, with its methods. The router is built from
/// this list, so a test that walks it walks every route.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/health", &["GET"]),
    ("/v1/models", &["GET"]),
    ("/v1/completions", &["POST"]),
    ("/v1/chat/completions", &["POST"]),
    ("/tokenize", &["POST"]),
    ("/detokenize", &["POST"]),
    ("/metrics", &["GET"]),
    ("/admin/v1/tenants", &["GET", "POST"]),
    ("/admin/v1/tenants/{name}/policy", &["POST"]),
    ("/admin/v1/keys", &["GET", "POST"]),
    ("/admin/v1/keys/{id}/revoke", &["POST"]),
    ("/admin/v1/budgets", &["GET", "POST"]),
    ("/admin/v1/limits", &["GET", "POST"]),
    ("/admin/v1/prices", &["POST"]),
    ("/admin/v1/usage", &["GET"]),
    ("/admin/v1/ledger", &["GET"]),
    ("/admin/v1/audit", &["GET"]),
    ("/admin/v1/audit/verify", &["GET"]),
    ("/admin/v1/audit/checkpoints", &["GET"]),
    ("/admin/v1/audit/erase", &["POST"]),
    ("/admin/v1/backends", &["GET"]),
    ("/admin/v1/config", &["GET", "POST"]),
    ("/admin/v1/config/history", &["GET"]),
    ("/admin/v1/config/versions/{version}", &["GET"]),
    ("/admin/v1/config/diff", &["GET"]),
    ("/admin/v1/config/rollback", &["POST"]),
];

fn route(path: &str) -> axum::routing::MethodRouter<Arc<AppState>> {
    match path {
        "/health" => get(health),
        "/v1/models" => get(openai::models),
        "/v1/completions" => post(openai::completions),
        "/v1/chat/completions" => post(openai::chat_completions),
        "/tokenize" => post(openai::tokenize),
        "/detokenize" => post(openai::detokenize),
        "/metrics" => get(metrics),
        "/admin/v1/tenants" => get(admin::tenants).post(admin::create_tenant),
        "/admin/v1/tenants/{name}/policy" => post(admin::set_policy),
        "/admin/v1/keys" => get(admin::keys).post(admin::create_key),
        "/admin/v1/keys/{id}/revoke" => post(admin::revoke_key),
        "/admin/v1/budgets" => get(admin::budgets).post(admin::set_budget),
        "/admin/v1/limits" => get(admin::limits).post(admin::set_limits),
        "/admin/v1/prices" => post(admin::set_price),
        "/admin/v1/usage" => get(admin::usage),
        "/admin/v1/ledger" => get(admin::ledger),
        "/admin/v1/audit" => get(admin::audit),
        "/admin/v1/audit/verify" => get(admin::verify),
        "/admin/v1/audit/checkpoints" => get(admin::checkpoints),
        "/admin/v1/audit/erase" => post(admin::erase),
        "/admin/v1/backends" => get(admin::backends),
        "/admin/v1/config" => get(admin::config).post(admin::apply_config),
        "/admin/v1/config/history" => get(admin::config_history),
        "/admin/v1/config/versions/{version}" => get(admin::config_version),
        "/admin/v1/config/diff" => get(admin::config_diff),
        "/admin/v1/config/rollback" => post(admin::rollback_config),
        // Unreachable while ROUTES and this match agree; a test keeps them so.
        _ => axum::routing::any(not_found),
    }
}

/// The whole API. Every route but [`gov::PUBLIC_ROUTES`] (unknown paths included) goes through
/// the governance gate: key checked, tenant bound, one audit record written.
pub fn router(
    backends: Backends,
    gov: Governance,
    auth: AuthConfig,
    mut config: ServerConfig,
) -> Router {
    if config.model_names.is_empty() {
        config.model_names.push("default".into());
    }
    let limit = config.max_body_bytes;
    let state = Arc::new(AppState {
        engine: backends.local,
        routing: backends.routing,
        gov,
        auth,
        config,
        started: unix_now(),
    });
    let mut app = Router::new();
    for &(path, _) in ROUTES {
        app = app.route(path, route(path));
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gov::gate,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            let engine = st.engine.as_ref().map_or_else(String::new, |e| {
                e.metrics().encode().trim_end_matches("# EOF\n").to_string()
            });
            format!(
                "{engine}{}{}# EOF\n",
                st.routing.encode_metrics(),
                st.gov.encode_metrics()
            )
        },
    )
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Method not allowed on {}", uri.path()),
    )
}

/// Binds `addr` and serves until `shutdown` resolves; in-flight requests finish first.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_listener(listener, app, shutdown).await
}

pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Without TCP_NODELAY, small SSE chunks and keep-alive responses wait on Nagle + delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
