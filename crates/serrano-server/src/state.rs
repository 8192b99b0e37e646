//! What every handler shares: the routing (and through it every backend), governance, the ways
//! to authenticate, and the server's limits.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serrano_gov::Governance;

use crate::error::ApiError;
use crate::listen::ConnLimits;
use crate::mcp::Gateway;
use crate::routing::{self, Routing};
use crate::shield::{HttpMetrics, InFlight, Refusals};

/// The server's limits; every one is a flag of `serrano serve` (README, Security).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive, whole; past it 408.
    pub body_timeout: std::time::Duration,
    /// Longest a request may take, queueing and every attempt included; past it the request
    /// is cancelled and answered 408 (or, mid-stream, ended with an error event).
    pub request_timeout: std::time::Duration,
    /// Most requests in flight at once (a stream until its last byte); past it 503.
    pub max_in_flight: usize,
    /// Requests one client address may have refused before authentication in a minute; past
    /// it every request from it is 429 without a key lookup until the minute ends.
    pub max_refusals_per_minute: u64,
    /// How often refusal counts are written to the audit log as per-address summaries (and the
    /// per-address window starts over).
    pub refusal_summary_every: std::time::Duration,
    /// What the listener lets in.
    pub conn: ConnLimits,
    /// Most rounds of tool calls a server-side tool loop (`{"type": "mcp"}` tools) makes
    /// before the model must answer in words.
    pub max_tool_steps: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 4 << 20,
            body_timeout: std::time::Duration::from_secs(30),
            request_timeout: std::time::Duration::from_secs(600),
            max_in_flight: 1024,
            max_refusals_per_minute: 600,
            refusal_summary_every: crate::shield::SUMMARY_EVERY,
            conn: ConnLimits::default(),
            max_tool_steps: 4,
        }
    }
}

/// The front door's protections before governance (`shield`).
pub struct Shield {
    pub metrics: Arc<HttpMetrics>,
    pub in_flight: Arc<InFlight>,
    pub refusals: Arc<Refusals>,
}

/// Ways to authenticate besides API keys.
#[derive(Default, Clone)]
pub struct AuthConfig {
    /// Who a request without credentials is, when anonymous access is on.
    pub anonymous: Option<serrano_gov::Principal>,
    /// Verifies OIDC/JWT bearer tokens, when a JWKS is configured.
    pub jwt: Option<Arc<serrano_gov::JwtVerifier>>,
}

pub struct AppState {
    pub shield: Shield,
    pub routing: Arc<Routing>,
    /// The MCP gateway (`/mcp`, and the server-side tool loop's calls).
    pub mcp: Gateway,
    pub gov: Governance,
    pub auth: AuthConfig,
    pub config: ServerConfig,
    pub started: u64,
}

impl AppState {
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
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
