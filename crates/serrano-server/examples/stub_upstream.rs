//! A fast OpenAI-compatible stub: answers every chat completion at once with a fixed message and
//! usage. Only for measuring a gateway's own overhead (the one place a stub is the right
//! upstream): `cargo run --release -p serrano-server --example stub_upstream -- PORT`.

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};

async fn chat(Json(req): Json<Value>) -> Json<Value> {
    Json(json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": req["model"].as_str().unwrap_or("stub"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    }))
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "stub"}]}),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18190);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    eprintln!("stub upstream on http://127.0.0.1:{port}/v1");
    axum::serve(listener, app).await
}
