//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serrano_api::{ErrorBody, ErrorResponse};
use serrano_engine::SubmitError;
use serrano_gov::GovError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed or a value is out of range.
    /// 429 with `Retry-After: 1`: a backend's queue or a share of it is full now.
    pub fn busy(why: impl std::fmt::Display) -> Self {
        ApiError {
            code: Some("rate_limit_exceeded".into()),
            retry_after_s: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{why}. Retry later."),
            )
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..Self::invalid(message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model '{model}' does not exist"),
            )
        }
    }

    /// 408: the generation outlasted `--request-timeout` (OpenAI clients retry these).
    pub fn timeout(limit: std::time::Duration) -> Self {
        ApiError {
            code: Some("request_timeout".into()),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                format!(
                    "Request timed out after {} s (--request-timeout)",
                    limit.as_secs_f64()
                ),
            )
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown route: {path}"),
        )
    }

    /// 500 with a generic message; the detail goes to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request",
        )
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) => ApiError::busy(format!("Server is busy: {e}")),
            SubmitError::TenantBusy { .. } | SubmitError::BatchBusy(_) => {
                ApiError::busy(e.to_string())
            }
            SubmitError::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The engine is not running",
            ),
            SubmitError::Invalid(m) => ApiError::invalid(m),
        }
    }
}

/// The message of an error response, kept on the response for the audit record.
#[derive(Debug, Clone)]
pub struct ErrorNote(pub String);

impl From<GovError> for ApiError {
    fn from(e: GovError) -> Self {
        let msg = e.to_string();
        let (status, kind, code) = match e {
            GovError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            GovError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", "forbidden"),
            GovError::OverBudget(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
            ),
            GovError::RateLimited { retry_after_s, .. } => {
                return ApiError {
                    code: Some("rate_limit_exceeded".into()),
                    retry_after_s: Some(retry_after_s),
                    ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", msg)
                }
            }
            GovError::Duplicate(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "duplicate_request_id",
            ),
            GovError::Invalid(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
            ),
            GovError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            GovError::Unavailable(_) => {
                // The detail (an fsync error, a path, a driver's message) is for the operator's
                // log, not for whoever sent the request.
                tracing::error!("governance store unavailable: {msg}");
                // Failing closed is meant to be temporary: clients back off and retry.
                return ApiError {
                    code: Some("governance_unavailable".into()),
                    retry_after_s: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "The governance store cannot take this request now; nothing was generated or charged. Retry later.",
                    )
                };
            }
        };
        ApiError {
            code: Some(code.into()),
            ..ApiError::new(status, kind, msg)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        resp.extensions_mut()
            .insert(ErrorNote(self.message.clone()));
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_fails_closed_asks_clients_to_retry() {
        let e = ApiError::from(GovError::Unavailable(
            "cannot sync /secret/path: EIO".into(),
        ));
        assert!(!e.message.contains("/secret/path"), "{}", e.message);
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let resp = ApiError::from(GovError::Forbidden("no".into())).into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }
}
