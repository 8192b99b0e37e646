//! Body extractors whose every failure is an OpenAI-style error: 413 past the body limit, 408
//! when the body does not arrive whole within `--body-timeout` (a slow upload must not hold a
//! connection and an in-flight slot for ever), 400 for malformed JSON or wrong field types
//! (axum's own `Json` answers in plain text).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

pub struct JsonBody<T>(pub T);

/// A UTF-8 body (the routing config's TOML).
pub struct TextBody(pub String);

/// The body as bytes (for a service that parses it itself, as the MCP endpoint's SDK does).
pub struct RawBody(pub Bytes);

/// The whole body, within the size limit and the time limit.
async fn read(req: Request, st: &Arc<AppState>) -> Result<Bytes, ApiError> {
    let limit = st.config.body_timeout;
    let read = tokio::time::timeout(limit, Bytes::from_request(req, st)).await;
    let read = read.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {} s (--body-timeout)",
                limit.as_secs_f64()
            ),
        )
    })?;
    read.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "Request body is larger than the server's limit (--max-body-bytes)",
            )
        } else {
            ApiError::new(
                status,
                "invalid_request_error",
                format!("Cannot read the request body: {r}"),
            )
        }
    })
}

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let bytes = read(req, st).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}")))
    }
}

impl FromRequest<Arc<AppState>> for TextBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let bytes = read(req, st).await?;
        String::from_utf8(bytes.to_vec())
            .map(TextBody)
            .map_err(|_| ApiError::invalid("The body is not UTF-8"))
    }
}

impl FromRequest<Arc<AppState>> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        read(req, st).await.map(RawBody)
    }
}
