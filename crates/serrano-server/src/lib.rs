//! serrano's OpenAI-compatible HTTP server (axum) around an [`EngineHandle`].
//!
//! Requests are parsed into the wire types of `serrano-api`, validated and translated into
//! engine requests here; the engine never sees HTTP. Every body has a size limit, every error is
//! an OpenAI-style JSON object, and accepted connections have TCP_NODELAY set.

mod error;
mod extract;
mod openai;
mod params;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serrano_engine::EngineHandle;

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

pub struct AppState {
    pub engine: EngineHandle,
    pub config: ServerConfig,
    pub started: u64,
}

impl AppState {
    /// Resolves the request's `model`; a missing one means the default model.
    pub fn model_name(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match requested {
            None | Some("") => Ok(self.config.model_names[0].clone()),
            Some(m) if self.config.model_names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(engine: EngineHandle, mut config: ServerConfig) -> Router {
    if config.model_names.is_empty() {
        config.model_names.push("default".into());
    }
    let limit = config.max_body_bytes;
    let state = Arc::new(AppState {
        engine,
        config,
        started: unix_now(),
    });
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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
        st.engine.metrics().encode(),
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
