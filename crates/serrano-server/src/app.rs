//! The axum application: the route table, the governance gate around it, and serving with
//! TCP_NODELAY on every accepted connection.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use serrano_gov::Governance;

use crate::error::ApiError;
use crate::extract::RawBody;
use crate::listen::App;
use crate::mcp::Gateway;
use crate::routing::Routing;
use crate::shield::{self, HttpMetrics, InFlight, Refusals};
use crate::state::{unix_now, AppState, AuthConfig, ServerConfig, Shield};
use crate::{admin, gov, openai};

/// The route table: every path the server answers, with its methods. The router is built from
/// this list, so a test that walks it walks every route.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/health", &["GET"]),
    ("/v1/models", &["GET"]),
    ("/v1/completions", &["POST"]),
    ("/v1/chat/completions", &["POST"]),
    ("/tokenize", &["POST"]),
    ("/detokenize", &["POST"]),
    ("/mcp", &["GET", "POST", "DELETE"]),
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
    ("/admin/v1/changes", &["GET"]),
    ("/admin/v1/changes/diff", &["GET"]),
    ("/admin/v1/changes/{id}", &["GET"]),
    ("/admin/v1/changes/{id}/rollback", &["POST"]),
    ("/admin/v1/changes/{id}/undo", &["POST"]),
    ("/ui", &["GET"]),
    ("/ui/console.js", &["GET"]),
    ("/ui/console.css", &["GET"]),
    ("/ui/uPlot.iife.min.js", &["GET"]),
    ("/ui/uPlot.min.css", &["GET"]),
];

fn route(path: &str, gateway: &Gateway) -> axum::routing::MethodRouter<Arc<AppState>> {
    match path {
        "/mcp" => {
            // The body is read here, within the server's size and time limits, before the
            // SDK's service parses it.
            let mcp = crate::mcp::service(gateway.clone());
            axum::routing::any(move |parts: Parts, RawBody(body): RawBody| {
                let mcp = mcp.clone();
                async move { crate::mcp::answer(&mcp, parts, body).await }
            })
        }
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
        "/admin/v1/changes" => get(admin::changes),
        "/admin/v1/changes/diff" => get(admin::change_diff_route),
        "/admin/v1/changes/{id}" => get(admin::change),
        "/admin/v1/changes/{id}/rollback" => post(admin::rollback_change),
        "/admin/v1/changes/{id}/undo" => post(admin::undo_change),
        "/ui"
        | "/ui/console.js"
        | "/ui/console.css"
        | "/ui/uPlot.iife.min.js"
        | "/ui/uPlot.min.css" => get(crate::console::file),
        // Unreachable while ROUTES and this match agree; a test keeps them so.
        _ => axum::routing::any(not_found),
    }
}

/// The whole API over `routing`'s backends. In front of everything, load shedding (past
/// `max_in_flight`, 503 before any governance work); then every route but
/// [`gov::PUBLIC_ROUTES`] (unknown paths included) goes through the governance gate: key
/// checked, tenant bound, one audit record written. Must be called inside a tokio runtime: it
/// starts the task that writes refusal summaries.
pub fn router(
    routing: Arc<Routing>,
    gov: Governance,
    auth: AuthConfig,
    config: ServerConfig,
) -> App {
    let limit = config.max_body_bytes;
    let conn = config.conn.clone();
    let http = Arc::new(HttpMetrics::new());
    let shield = Shield {
        metrics: http.clone(),
        in_flight: Arc::new(InFlight::new(config.max_in_flight, http.clone())),
        refusals: Arc::new(Refusals::new(config.max_refusals_per_minute, http.clone())),
    };
    let in_flight = shield.in_flight.clone();
    tokio::spawn(write_refusal_summaries(
        gov.clone(),
        shield.refusals.clone(),
        config.refusal_summary_every,
    ));
    let state = Arc::new(AppState {
        shield,
        mcp: Gateway::new(routing.clone()),
        routing,
        gov,
        auth,
        config,
        started: unix_now(),
    });
    let mut app = Router::new();
    for &(path, _) in ROUTES {
        app = app.route(path, route(path, &state.mcp));
    }
    let router = app
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gov::gate,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            in_flight,
            shield::shed,
        ))
        .with_state(state);
    App { router, http, conn }
}

/// Every `period` (a minute), one audit record per client address whose requests were refused
/// before authentication (count and statuses), and one for every other address together.
async fn write_refusal_summaries(gov: Governance, refusals: Arc<Refusals>, period: Duration) {
    let mut every = tokio::time::interval(period);
    every.tick().await;
    loop {
        every.tick().await;
        for (addr, r) in refusals.take() {
            let who = addr.map_or_else(|| "other addresses".to_string(), |a| a.to_string());
            let statuses: Vec<String> = r
                .statuses
                .iter()
                .map(|(s, n)| format!("{s} x {n}"))
                .collect();
            let top = r
                .statuses
                .iter()
                .max_by_key(|(_, n)| **n)
                .map_or(401, |(s, _)| *s);
            let ticket = serrano_gov::Ticket::new(
                &gov,
                format!("refused-{}", rand::random::<u64>()),
                "-",
                "(refused before authentication)",
            );
            let summary = format!(
                "{} requests from {who} refused before authentication in the last {} s ({})",
                r.count,
                period.as_secs(),
                statuses.join(", ")
            );
            if let Err(e) = ticket.finish(top, Some(summary)).await {
                tracing::error!("cannot write a refusal summary: {e}");
            }
        }
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
) -> impl axum::response::IntoResponse {
    let budgets = st.gov.encode_budget_metrics().await.unwrap_or_else(|e| {
        tracing::warn!("/metrics without budgets: {e}");
        String::new()
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            let engines: Vec<String> = st
                .routing
                .engines()
                .iter()
                .map(|e| e.metrics().encode())
                .collect();
            format!(
                "{}{}{}{}{budgets}# EOF\n",
                merge_families(&engines),
                st.routing.encode_metrics(),
                st.shield.metrics.encode(),
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

/// Several engines' OpenMetrics texts as one: each family's metadata once, then every engine's
/// samples of it (their `model_name` labels tell them apart). Concatenating the texts would
/// repeat families, which OpenMetrics parsers reject. Written by hand: prometheus-client
/// encodes one registry, and each engine owns its own.
fn merge_families(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> =
        Default::default();
    for text in texts {
        let mut current = String::new();
        for line in text.lines().filter(|l| *l != "# EOF") {
            if let Some(rest) = line.strip_prefix("# ") {
                // `# HELP name ...`, `# TYPE name ...`, `# UNIT name ...`
                let name = rest.split_whitespace().nth(1).unwrap_or("").to_string();
                if name != current {
                    current = name.clone();
                    if !families.contains_key(&name) {
                        order.push(name.clone());
                    }
                }
                let (meta, samples) = families.entry(name).or_default();
                if samples.is_empty() && !meta.iter().any(|m| m == line) {
                    meta.push(line.to_string());
                }
            } else {
                families
                    .entry(current.clone())
                    .or_default()
                    .1
                    .push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (meta, samples) = &families[&name];
        for l in meta.iter().chain(samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_metrics_merge_by_family() {
        let a = "# HELP x X.\n# TYPE x gauge\nx{model_name=\"a\"} 1\n# HELP y Y.\n# TYPE y counter\ny_total{model_name=\"a\"} 2\n# EOF\n";
        let b = a.replace("\"a\"", "\"b\"");
        let merged = super::merge_families(&[a.to_string(), b]);
        assert_eq!(
            merged,
            "# HELP x X.\n# TYPE x gauge\nx{model_name=\"a\"} 1\nx{model_name=\"b\"} 1\n# HELP y Y.\n# TYPE y counter\ny_total{model_name=\"a\"} 2\ny_total{model_name=\"b\"} 2\n"
        );
        assert_eq!(
            super::merge_families(&[a.to_string()]),
            a.trim_end_matches("# EOF\n")
        );
    }
}
