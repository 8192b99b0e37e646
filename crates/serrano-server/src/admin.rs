//! `/admin/v1/...`: tenants, keys, budgets, prices, usage and audit, for admin-scoped keys (the
//! gate refuses other keys with 403). The same operations back `serrano admin` on the CLI.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use serrano_gov::{BudgetPeriod, BudgetUnit, GovError, NewKey, Retention, Role};

use crate::error::ApiError;
use crate::extract::{JsonBody, TextBody};
use crate::state::AppState;

type St = State<Arc<AppState>>;

/// Most audit records one listing returns.
const MAX_AUDIT_PAGE: i64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
    #[serde(default)]
    retention: Retention,
}

pub async fn create_tenant(
    State(st): St,
    JsonBody(t): JsonBody<NewTenant>,
) -> Result<Response, ApiError> {
    let info = st.gov.create_tenant(&t.name, t.retention).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub async fn tenants(State(st): St) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": st.gov.tenants().await?}),
    ))
}

/// Sets a tenant's safety-filter policy (the body is the policy; `null` removes it).
pub async fn set_policy(
    State(st): St,
    Path(name): Path<String>,
    JsonBody(policy): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let text = (!policy.is_null()).then(|| policy.to_string());
    st.gov.set_policy(&name, text.as_deref()).await?;
    Ok(Json(json!({"tenant": name, "policy": policy})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    tenant: String,
    #[serde(default)]
    name: String,
    role: Option<Role>,
    models: Option<Vec<String>>,
    /// May ask for the interactive latency class though its tenant's is batch.
    #[serde(default)]
    grant_interactive: bool,
    /// Seconds from now until the key stops working.
    expires_in: Option<u64>,
}

/// Creates a key; the response is the only place its secret ever appears.
pub async fn create_key(
    State(st): St,
    JsonBody(k): JsonBody<KeyRequest>,
) -> Result<Response, ApiError> {
    let expires_ms = k
        .expires_in
        .map(|s| serrano_gov::now_ms().saturating_add((s as i64).saturating_mul(1000)));
    let (info, secret) = st
        .gov
        .create_key(NewKey {
            tenant: k.tenant,
            name: k.name,
            role: k.role,
            models: k.models,
            grant_interactive: k.grant_interactive,
            expires_ms,
        })
        .await?;
    let mut body = serde_json::to_value(info).map_err(ApiError::internal)?;
    body["key"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
pub struct TenantFilter {
    tenant: Option<String>,
}

pub async fn keys(State(st): St, Query(f): Query<TenantFilter>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": st.gov.keys(f.tenant.as_deref()).await?}),
    ))
}

pub async fn revoke_key(State(st): St, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    st.gov.revoke_key(id).await?;
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    tenant: String,
    key_id: Option<i64>,
    unit: BudgetUnit,
    period: BudgetPeriod,
    /// Tokens, or dollars for `usd`.
    limit: f64,
}

pub async fn set_budget(
    State(st): St,
    JsonBody(b): JsonBody<BudgetRequest>,
) -> Result<Json<Value>, ApiError> {
    let limit = budget_amount(b.unit, b.limit)?;
    let id = st
        .gov
        .set_budget(&b.tenant, b.key_id, b.unit, b.period, limit)
        .await?;
    Ok(Json(json!({"id": id, "limit": limit})))
}

/// A budget limit in ledger units: whole tokens, or nano-dollars.
pub fn budget_amount(unit: BudgetUnit, limit: f64) -> Result<i64, GovError> {
    if !(0.0..=1e15).contains(&limit) {
        return Err(GovError::Invalid(
            "limit must be a non-negative number".into(),
        ));
    }
    Ok(match unit {
        BudgetUnit::Tokens => limit.floor() as i64,
        BudgetUnit::Usd => (limit * serrano_gov::NUSD_PER_USD).round() as i64,
    })
}

pub async fn budgets(
    State(st): St,
    Query(f): Query<TenantFilter>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": st.gov.budgets(f.tenant.as_deref()).await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    tenant: String,
    key_id: Option<i64>,
    /// Requests per minute.
    rpm: Option<i64>,
    /// Tokens (prompt plus max_tokens, as reserved) per minute.
    tpm: Option<i64>,
    max_concurrent: Option<i64>,
    tool_calls_per_minute: Option<i64>,
    tool_calls_per_day: Option<i64>,
}

pub async fn set_limits(
    State(st): St,
    JsonBody(l): JsonBody<LimitRequest>,
) -> Result<Json<Value>, ApiError> {
    let limits = serrano_gov::Limits {
        rpm: l.rpm,
        tpm: l.tpm,
        max_concurrent: l.max_concurrent,
        tool_calls_per_minute: l.tool_calls_per_minute,
        tool_calls_per_day: l.tool_calls_per_day,
    };
    let id = st.gov.set_limits(&l.tenant, l.key_id, limits).await?;
    Ok(Json(json!({"id": id})))
}

pub async fn limits(State(st): St, Query(f): Query<TenantFilter>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": st.gov.limits(f.tenant.as_deref()).await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRequest {
    model: String,
    #[serde(default = "local")]
    backend: String,
    /// Dollars per million prompt tokens.
    input_per_million: f64,
    /// Dollars per million completion tokens.
    output_per_million: f64,
}

fn local() -> String {
    serrano_gov::LOCAL_BACKEND.into()
}

pub async fn set_price(
    State(st): St,
    JsonBody(p): JsonBody<PriceRequest>,
) -> Result<Json<Value>, ApiError> {
    st.gov
        .set_price(
            &p.model,
            &p.backend,
            p.input_per_million,
            p.output_per_million,
        )
        .await?;
    Ok(Json(json!({"model": p.model, "backend": p.backend})))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    /// Comma-separated: tenant, key, model, day.
    group_by: Option<String>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

pub async fn usage(State(st): St, Query(q): Query<UsageQuery>) -> Result<Response, ApiError> {
    let group = q.group_by.unwrap_or_else(|| "tenant,model,day".into());
    let fields: Vec<&str> = group
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let rows = st.gov.usage(&fields).await?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(json!({"object": "list", "data": rows})).into_response()),
        Some("csv") => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            serrano_gov::usage_csv(&rows),
        )
            .into_response()),
        Some(other) => Err(ApiError::invalid_param(
            "format",
            format!("unknown format '{other}' (json or csv)"),
        )),
    }
}

pub async fn ledger(State(st): St) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(st.gov.ledger_state().await?).map_err(ApiError::internal)?,
    ))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

pub async fn audit(State(st): St, Query(q): Query<AuditQuery>) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_AUDIT_PAGE);
    let data = st.gov.audit_records(q.after.unwrap_or(0), limit).await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn checkpoints(State(st): St) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": st.gov.checkpoints().await?}),
    ))
}

pub async fn verify(State(st): St) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(st.gov.verify_audit().await?).map_err(ApiError::internal)?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    tenant: String,
}

pub async fn erase(
    State(st): St,
    JsonBody(e): JsonBody<EraseRequest>,
) -> Result<Json<Value>, ApiError> {
    let n = st.gov.erase_content(&e.tenant).await?;
    Ok(Json(json!({"tenant": e.tenant, "erased_records": n})))
}

/// Every backend of the active config: health, breaker, load, latency estimates.
pub async fn backends(State(st): St) -> Json<Value> {
    let dep = st.routing.router.active();
    Json(json!({
        "object": "list",
        "config_version": dep.version,
        "data": dep.views(std::time::Instant::now()),
    }))
}

/// The active config: its version, hash and text.
pub async fn config(State(st): St) -> Json<Value> {
    let dep = st.routing.router.active();
    Json(json!({
        "version": dep.version,
        "hash": dep.config.hash,
        "source": dep.config.source,
    }))
}

/// Who applied a config: the admin key's shown prefix.
fn author(ticket: &serrano_gov::Ticket) -> String {
    ticket
        .principal()
        .map_or_else(|| "unknown".into(), |p| p.key_prefix)
}

/// Applies a config (the body is its TOML text). An invalid one is refused with the line and
/// field at fault, and the active config keeps serving.
pub async fn apply_config(
    State(st): St,
    axum::Extension(ticket): axum::Extension<serrano_gov::Ticket>,
    TextBody(body): TextBody,
) -> Result<Json<Value>, ApiError> {
    let version = st.routing.apply(&body, &author(&ticket), "apply").await?;
    Ok(Json(json!({"version": version})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    version: u64,
}

/// Applies a stored version again.
pub async fn rollback_config(
    State(st): St,
    axum::Extension(ticket): axum::Extension<serrano_gov::Ticket>,
    JsonBody(r): JsonBody<Rollback>,
) -> Result<Json<Value>, ApiError> {
    let version = st.routing.rollback(r.version, &author(&ticket)).await?;
    Ok(Json(json!({"version": version})))
}

/// Every stored version (without texts) and every switch, oldest first.
pub async fn config_history(State(st): St) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({
        "active": st.routing.router.active().version,
        "versions": st.gov.config_versions().await?,
        "events": st.gov.config_events().await?,
    })))
}

pub async fn config_version(
    State(st): St,
    Path(version): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(st.gov.config_version(version).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    from: u64,
    to: u64,
}

/// A unified diff between two stored versions' texts.
pub async fn config_diff(State(st): St, Query(q): Query<DiffQuery>) -> Result<Response, ApiError> {
    let a = st.gov.config_version(q.from).await?;
    let b = st.gov.config_version(q.to).await?;
    let diff = serrano_router::config::diff(
        a.source.as_deref().unwrap_or_default(),
        b.source.as_deref().unwrap_or_default(),
        &format!("version {}", q.from),
        &format!("version {}", q.to),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], diff).into_response())
}
