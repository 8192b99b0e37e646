//! `/admin/v1/...`: tenants, keys, budgets, prices, usage and audit, for admin-scoped keys (the
//! gate refuses other keys with 403). The same operations back `serrano admin` on the CLI.
//! Every change is an admin change of `serrano-gov` (`changes`): stored with who made it and the
//! values before and after, and audited; budgets, limits, prices and policies are versions that
//! `/admin/v1/changes/{id}/rollback` and `.../undo` restore.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use serrano_gov::{
    BudgetPeriod, BudgetUnit, Changed, GovError, NewKey, Retention, Role, Target, Ticket,
};

use crate::error::ApiError;
use crate::extract::{JsonBody, TextBody};
use crate::state::AppState;

type St = State<Arc<AppState>>;
/// The request's ticket, whose principal is the change's actor.
type Actor = axum::Extension<Ticket>;

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
    axum::Extension(ticket): Actor,
    JsonBody(t): JsonBody<NewTenant>,
) -> Result<Response, ApiError> {
    let info = st.gov.create_tenant(&t.name, t.retention).await?;
    let after = json!({"retention": info.retention});
    st.gov
        .record_event(
            &author(&ticket),
            "create",
            "tenant",
            json!({"tenant": info.name}),
            after,
        )
        .await?;
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
    axum::Extension(ticket): Actor,
    Path(name): Path<String>,
    JsonBody(policy): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let target = Target::Policy {
        tenant: name.clone(),
    };
    let c = st.gov.change(&author(&ticket), target, policy).await?;
    Ok(Json(changed(
        &c,
        json!({"tenant": name, "policy": c.record.after}),
    )))
}

/// A change's answer: `fields`, with the change's id and the audit record's sequence number.
fn changed(c: &Changed, mut fields: Value) -> Value {
    fields["change"] = json!(c.record.id);
    fields["audit_seq"] = json!(c.record.audit_seq);
    fields
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
    axum::Extension(ticket): Actor,
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
    let target = json!({"tenant": body["tenant"], "key_id": body["id"]});
    st.gov
        .record_event(&author(&ticket), "create", "key", target, body.clone())
        .await?;
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

pub async fn revoke_key(
    State(st): St,
    axum::Extension(ticket): Actor,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    st.gov.revoke_key(id).await?;
    let (target, after) = (json!({"key_id": id}), json!({"revoked": true}));
    st.gov
        .record_event(&author(&ticket), "revoke", "key", target, after)
        .await?;
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
    axum::Extension(ticket): Actor,
    JsonBody(b): JsonBody<BudgetRequest>,
) -> Result<Json<Value>, ApiError> {
    let limit = budget_amount(b.unit, b.limit)?;
    let target = Target::Budget {
        tenant: b.tenant,
        key_id: b.key_id,
        unit: b.unit,
        period: b.period,
    };
    let c = st
        .gov
        .change(&author(&ticket), target, json!(limit))
        .await?;
    Ok(Json(changed(&c, json!({"id": c.row_id, "limit": limit}))))
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
    axum::Extension(ticket): Actor,
    JsonBody(l): JsonBody<LimitRequest>,
) -> Result<Json<Value>, ApiError> {
    let limits = serrano_gov::Limits {
        rpm: l.rpm,
        tpm: l.tpm,
        max_concurrent: l.max_concurrent,
        tool_calls_per_minute: l.tool_calls_per_minute,
        tool_calls_per_day: l.tool_calls_per_day,
    };
    let target = Target::Limits {
        tenant: l.tenant,
        key_id: l.key_id,
    };
    let c = st
        .gov
        .change(&author(&ticket), target, json!(limits))
        .await?;
    Ok(Json(changed(&c, json!({"id": c.row_id}))))
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
    axum::Extension(ticket): Actor,
    JsonBody(p): JsonBody<PriceRequest>,
) -> Result<Json<Value>, ApiError> {
    let value = serrano_gov::price_from_usd(p.input_per_million, p.output_per_million)?;
    let target = Target::Price {
        model: p.model.clone(),
        backend: p.backend.clone(),
    };
    let c = st.gov.change(&author(&ticket), target, value).await?;
    Ok(Json(changed(
        &c,
        json!({"model": p.model, "backend": p.backend}),
    )))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    /// Comma-separated: tenant, key, model, day, backend.
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
    axum::Extension(ticket): Actor,
    JsonBody(e): JsonBody<EraseRequest>,
) -> Result<Json<Value>, ApiError> {
    let n = st.gov.erase_content(&e.tenant).await?;
    let (target, after) = (json!({"tenant": e.tenant}), json!({"erased_records": n}));
    st.gov
        .record_event(&author(&ticket), "erase", "content", target, after)
        .await?;
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

/// Who made a change: the admin key's shown prefix.
fn author(ticket: &Ticket) -> String {
    ticket
        .principal()
        .map_or_else(|| "unknown".into(), |p| p.key_prefix)
}

/// Applies a config (the body is its TOML text). An invalid one is refused with the line and
/// field at fault, and the active config keeps serving.
pub async fn apply_config(
    State(st): St,
    axum::Extension(ticket): Actor,
    TextBody(body): TextBody,
) -> Result<Json<Value>, ApiError> {
    let version = st.routing.apply(&body, &author(&ticket), "apply").await?;
    let after = json!({"version": version});
    st.gov
        .record_event(&author(&ticket), "apply", "config", json!({}), after)
        .await?;
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
    axum::Extension(ticket): Actor,
    JsonBody(r): JsonBody<Rollback>,
) -> Result<Json<Value>, ApiError> {
    let version = st.routing.rollback(r.version, &author(&ticket)).await?;
    let after = json!({"version": version});
    st.gov
        .record_event(&author(&ticket), "rollback", "config", json!({}), after)
        .await?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeQuery {
    /// Only changes of this kind (policy, budget, limits, price, tenant, key, content, config).
    kind: Option<String>,
    /// Most changes returned, newest first (at most `MAX_CHANGES_PAGE`).
    limit: Option<i64>,
}

/// Admin changes, newest first.
pub async fn changes(State(st): St, Query(q): Query<ChangeQuery>) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    let data = st.gov.changes(q.kind.as_deref(), None, limit).await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn change(State(st): St, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(st.gov.change_record(id).await?)))
}

/// Applies again what change `id` set.
pub async fn rollback_change(
    State(st): St,
    axum::Extension(ticket): Actor,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let c = st.gov.rollback_change(&author(&ticket), id).await?;
    Ok(Json(json!(c.record)))
}

/// Restores what change `id` replaced.
pub async fn undo_change(
    State(st): St,
    axum::Extension(ticket): Actor,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let c = st.gov.undo_change(&author(&ticket), id).await?;
    Ok(Json(json!(c.record)))
}

/// A unified diff between the values two changes set (pretty JSON), e.g. two versions of a
/// policy.
pub async fn change_diff_route(
    State(st): St,
    Query(q): Query<DiffQuery>,
) -> Result<Response, ApiError> {
    let from = i64::try_from(q.from).unwrap_or(i64::MAX);
    let to = i64::try_from(q.to).unwrap_or(i64::MAX);
    let diff = change_diff(&st.gov, from, to).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], diff).into_response())
}

/// The diff `/admin/v1/changes/diff` and `serrano admin change diff` show.
pub async fn change_diff(
    gov: &serrano_gov::Governance,
    from: i64,
    to: i64,
) -> Result<String, GovError> {
    let text = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let a = gov.change_record(from).await?;
    let b = gov.change_record(to).await?;
    Ok(serrano_router::config::diff(
        &text(&a.after),
        &text(&b.after),
        &format!("change {from}"),
        &format!("change {to}"),
    ))
}
