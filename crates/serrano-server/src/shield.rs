//! The front door's own protections, in front of governance: load shedding (a cap on requests in
//! flight, answered 503 before any governance write), and what a refused unauthenticated request
//! costs (a metric and a share of a per-address summary, never an audit record of its own; past a
//! per-address rate, not even a key lookup).
//!
//! Every refusal here is counted in `/metrics`, not audited one by one: the audit log holds one
//! record per request that passed authentication and admission, plus at most one summary record
//! per client address per minute for those that did not (see [`Refusals`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// Addresses a minute's refusal counts keep apart; the rest share one entry. Bounds the map
/// a flood from many addresses could grow, and the summary records a minute writes.
pub const MAX_REFUSING_ADDRESSES: usize = 1024;
/// How often refusal summaries are written to the audit log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

type Labels = Vec<(String, String)>;

/// The front door's metrics (`serrano_http_*`).
pub struct HttpMetrics {
    registry: Registry,
    connections_open: Gauge,
    connections_refused: Counter,
    requests_shed: Counter,
    refused: Family<Labels, Counter>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpMetrics {
    pub fn new() -> HttpMetrics {
        let mut registry = Registry::with_prefix("serrano_http");
        let m = HttpMetrics {
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            requests_shed: Counter::default(),
            refused: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_open",
            "Connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            m.connections_refused.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests answered 503 because --max-in-flight requests were in flight",
            m.requests_shed.clone(),
        );
        registry.register(
            "refused",
            "Requests refused before authentication completed, by route class and status (summarized in the audit log, not recorded one by one)",
            m.refused.clone(),
        );
        HttpMetrics { registry, ..m }
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts an open connection until the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.clone())
    }

    fn refused(&self, path: &str, status: StatusCode) {
        let labels = vec![
            ("route".to_string(), route_class(path).to_string()),
            ("status".to_string(), status.as_u16().to_string()),
        ];
        self.refused.get_or_create(&labels).inc();
    }

    /// Prometheus text (without the `# EOF` line).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            return String::new();
        }
        out.trim_end_matches("# EOF\n").to_string()
    }
}

/// An open connection, counted until dropped.
pub struct OpenConnection(Arc<HttpMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// A few route classes for labels: client-chosen paths must not become label values.
fn route_class(path: &str) -> &'static str {
    if path.starts_with("/v1/") {
        "inference"
    } else if path.starts_with("/admin/") {
        "admin"
    } else if path == "/metrics" {
        "metrics"
    } else if path == "/tokenize" || path == "/detokenize" {
        "tokenizer"
    } else {
        "other"
    }
}

// ------------------------------------------------------------------ load shedding

/// The cap on requests in flight (`--max-in-flight`): a request holds a slot until its
/// response body ends, so streams count for their whole length.
pub struct InFlight {
    slots: Arc<Semaphore>,
    metrics: Arc<HttpMetrics>,
}

impl InFlight {
    pub fn new(max: usize, metrics: Arc<HttpMetrics>) -> InFlight {
        InFlight {
            slots: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }
}

/// Middleware: past the cap, 503 with `Retry-After` at once, before the gate (nothing is
/// authenticated, reserved or audited for a shed request). `GET /health` is never shed.
pub async fn shed(State(limit): State<Arc<InFlight>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let Ok(slot) = limit.slots.clone().try_acquire_owned() else {
        limit.metrics.requests_shed.inc();
        return ApiError {
            code: Some("server_overloaded".into()),
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The server has as many requests in flight as it takes (--max-in-flight). Retry later.",
            )
        }
        .into_response();
    };
    let (parts, body) = next.run(req).await.into_parts();
    Response::from_parts(parts, Body::new(Holding { body, _slot: slot }))
}

/// A response body that holds its request's in-flight slot until it ends.
struct Holding {
    body: Body,
    _slot: OwnedSemaphorePermit,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

// ------------------------------------------------------------------ refusals before auth

/// One address's refusals in the current minute.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Refused {
    pub count: u64,
    /// Counts by status.
    pub statuses: std::collections::BTreeMap<u16, u64>,
}

/// Requests refused before authentication completed (no key, a wrong key, a bad request id),
/// per client address and minute. Each address may be refused `per_minute` times a minute;
/// past that every request from it is refused at once (429) without a key lookup until the
/// minute ends. The counts are written to the audit log as one summary record per address per
/// minute ([`Refusals::take`], which also starts the next minute).
pub struct Refusals {
    per_minute: u64,
    metrics: Arc<HttpMetrics>,
    state: Mutex<Window>,
}

struct Window {
    by_address: HashMap<IpAddr, Refused>,
    /// Addresses past [`MAX_REFUSING_ADDRESSES`], counted together.
    others: Refused,
}

impl Refusals {
    pub fn new(per_minute: u64, metrics: Arc<HttpMetrics>) -> Refusals {
        Refusals {
            per_minute,
            metrics,
            state: Mutex::new(Window {
                by_address: HashMap::new(),
                others: Refused::default(),
            }),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // Plain counters: a panic while holding the lock left nothing half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` used up its refusals this minute (then it gets 429 without a key lookup).
    pub fn exhausted(&self, addr: Option<IpAddr>) -> bool {
        let w = self.window();
        let count = match addr.and_then(|a| w.by_address.get(&a)) {
            Some(r) => r.count,
            None if w.by_address.len() >= MAX_REFUSING_ADDRESSES => w.others.count,
            None => 0,
        };
        count >= self.per_minute.max(1)
    }

    /// Counts one refusal of a request to `path` from `addr`.
    pub fn refused(&self, addr: Option<IpAddr>, path: &str, status: StatusCode) {
        self.metrics.refused(path, status);
        let mut w = self.window();
        let full = w.by_address.len() >= MAX_REFUSING_ADDRESSES;
        let entry = match addr {
            Some(a) if !full || w.by_address.contains_key(&a) => w.by_address.entry(a).or_default(),
            _ => &mut w.others,
        };
        entry.count += 1;
        *entry.statuses.entry(status.as_u16()).or_default() += 1;
    }

    /// The counts since the last call, per address (`None`: every other address), and a fresh
    /// window.
    pub fn take(&self) -> Vec<(Option<IpAddr>, Refused)> {
        let mut w = self.window();
        let by_address = std::mem::take(&mut w.by_address);
        let others = std::mem::take(&mut w.others);
        let mut out: Vec<(Option<IpAddr>, Refused)> =
            by_address.into_iter().map(|(a, r)| (Some(a), r)).collect();
        if others.count > 0 {
            out.push((None, others));
        }
        out
    }
}

/// The client address of a request, from the listener.
pub fn client_addr(req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_address_and_capped() {
        let r = Refusals::new(3, Arc::new(HttpMetrics::new()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(!r.exhausted(Some(a)));
            r.refused(Some(a), "/v1/chat/completions", StatusCode::UNAUTHORIZED);
        }
        assert!(r.exhausted(Some(a)));
        assert!(!r.exhausted(Some("10.0.0.2".parse().unwrap())));
        // A flood from many addresses shares one entry past the cap.
        for i in 0..(MAX_REFUSING_ADDRESSES as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            r.refused(Some(ip), "/x", StatusCode::UNAUTHORIZED);
        }
        let taken = r.take();
        assert_eq!(taken.len(), MAX_REFUSING_ADDRESSES + 1);
        let others = taken.iter().find(|(a, _)| a.is_none()).unwrap();
        assert_eq!(others.1.count, 11);
        assert!(r.take().is_empty(), "take starts a new window");
    }

    #[test]
    fn route_classes_do_not_echo_paths() {
        assert_eq!(route_class("/v1/chat/completions"), "inference");
        assert_eq!(route_class(&format!("/{}", "x".repeat(60_000))), "other");
    }
}
