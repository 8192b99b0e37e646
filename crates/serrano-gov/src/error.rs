/// What a governance check can refuse with; each maps to one HTTP status at the API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GovError {
    /// 401: no key, an unknown key, or a revoked or expired one.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid key without the scope for this.
    #[error("{0}")]
    Forbidden(String),
    /// 429: the named budget has not enough left for the request's worst case.
    #[error("{0}")]
    OverBudget(String),
    /// 429: a rate limit; retry after the given seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    /// 409: the request id was used before (a replay is never charged twice).
    #[error("request id '{0}' was already used")]
    Duplicate(String),
    /// 400: a bad admin argument.
    #[error("{0}")]
    Invalid(String),
    /// 404
    #[error("{0} not found")]
    NotFound(String),
    /// 503: the store cannot be read or written; requests fail closed.
    #[error("the governance store is unavailable: {0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for GovError {
    fn from(e: sqlx::Error) -> Self {
        GovError::Unavailable(e.to_string())
    }
}

impl From<rusqlite::Error> for GovError {
    fn from(e: rusqlite::Error) -> Self {
        GovError::Unavailable(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for GovError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        GovError::Unavailable(format!("migration failed: {e}"))
    }
}
