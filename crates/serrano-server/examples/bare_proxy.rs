//! The floor under any gateway on this machine: a proxy with no governance at all (no auth,
//! budgets, limits, filters or audit) that parses the request, forwards it over a pooled
//! keep-alive connection, parses the answer and re-encodes it, on the same runtime shape as
//! `serrano gateway` (multi-thread tokio, axum, reqwest, TCP_NODELAY both ways). Run it beside
//! the stub to see how much of the gateway's added latency is the proxying itself:
//! `bare_proxy PORT UPSTREAM_URL` (e.g. `18193 http://127.0.0.1:18190/v1/chat/completions`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::Value;

struct Upstream {
    client: reqwest::Client,
    url: String,
}

async fn chat(
    State(up): State<Arc<Upstream>>,
    Json(req): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    let resp = up
        .client
        .post(&up.url)
        .json(&req)
        .send()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    let body: Value = resp.json().await.map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(Json(body))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, url] = args.as_slice() else {
        eprintln!("usage: bare_proxy PORT UPSTREAM_CHAT_URL");
        std::process::exit(2);
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("PORT must be a number");
        std::process::exit(2);
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()
        .map_err(std::io::Error::other)?;
    let up = Arc::new(Upstream {
        client,
        url: url.clone(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { "ok" }))
        .with_state(up);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}
