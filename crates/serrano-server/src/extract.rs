//! A JSON body extractor whose every failure is an OpenAI-style error: 413 past the body limit,
//! 400 for malformed JSON or wrong field types (axum's own `Json` answers in plain text).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
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
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}")))
    }
}
