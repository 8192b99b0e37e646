//! Admin changes: every change an operator makes (through the admin API or the CLI) is a row of
//! `admin_changes` and a record in the audit chain, naming who (`actor`: the admin key's prefix,
//! or `cli:user@host`), what (`kind`, `target`), and the values before and after.
//!
//! Budgets, rate limits, prices and safety policies are **versions**: [`Target`] names one
//! setting, each change stores the whole value it set, and [`Governance::rollback_change`]
//! applies a stored version's value again ([`Governance::undo_change`] its predecessor's), as a
//! new change of its own. Other changes (a tenant or key created, a key revoked, a retention
//! changed, content erased, a routing config applied) are recorded the same way but are not
//! reversible here: the routing config has its own versions (`versions.rs`), and a revoked key
//! stays revoked.
//!
//! Order, so that no change goes unaudited: a versioned change's row is written first (the
//! write-ahead record of what is about to be set), then the value is applied, then the audit
//! record appended and its `seq` noted on the row. A process that dies between those steps
//! leaves a row without `audit_seq`; [`Governance::finish_interrupted_changes`] (run when a
//! server starts) applies its value again (every versioned value is set, not added, so applying
//! twice is applying once) and audits it. An event is recorded after the change it describes:
//! a crash between the two loses that event's record, which the closing note of issue 32 states.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit::{sha256_hex, AuditRecord};
use crate::error::GovError;
use crate::storage::{ChangeFilter, FinishOp};
use crate::store::Governance;
use crate::time::now_ms;
use crate::types::{BudgetPeriod, BudgetUnit, ChangeRecord, Limits, NewChange};

/// One versioned setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// A tenant's safety-filter policy; the value is the policy (JSON), `null` for none.
    Policy { tenant: String },
    /// A budget of a tenant, or of one of its keys; the value is the limit in tokens, or in
    /// nano-dollars for `usd`. A budget cannot be removed (its spend would go with it), only set.
    Budget {
        tenant: String,
        key_id: Option<i64>,
        unit: BudgetUnit,
        period: BudgetPeriod,
    },
    /// The rate limits of a tenant, or of one of its keys; the value is [`Limits`] (an object
    /// with any of its fields), `null` for none.
    Limits { tenant: String, key_id: Option<i64> },
    /// A model's price on a backend; the value is `{"input_nusd_per_token": N,
    /// "output_nusd_per_token": N}`, `null` for none.
    Price { model: String, backend: String },
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Policy { .. } => "policy",
            Target::Budget { .. } => "budget",
            Target::Limits { .. } => "limits",
            Target::Price { .. } => "price",
        }
    }

    fn tenant(&self) -> Option<&str> {
        match self {
            Target::Policy { tenant }
            | Target::Budget { tenant, .. }
            | Target::Limits { tenant, .. } => Some(tenant),
            Target::Price { .. } => None,
        }
    }

    /// The canonical JSON text a target is stored and looked up by.
    pub fn text(&self) -> Result<String, GovError> {
        serde_json::to_string(self).map_err(|e| GovError::Invalid(e.to_string()))
    }
}

/// A change as applied: its stored record, and the id of the row it set (a budget's or
/// limits' id) where it has one.
#[derive(Debug, Clone)]
pub struct Changed {
    pub record: ChangeRecord,
    pub row_id: Option<i64>,
}

/// Most changes one listing returns.
pub const MAX_CHANGES_PAGE: i64 = 1000;
/// A before or after value longer than this (as JSON text) is kept whole in `admin_changes`
/// but appears in the audit record as its sha256 and length: a 1 MB policy must not become a
/// chained record kept forever.
pub const MAX_CHANGE_VALUE_BYTES: usize = 2048;
/// Longest model or backend name a price may name.
const MAX_NAME_BYTES: usize = 256;
/// A change without its audit record this old was interrupted (a live one takes milliseconds).
const INTERRUPTED_AFTER_MS: i64 = 60_000;
/// Largest price, nano-dollars per token ($1,000,000 per million tokens).
const MAX_PRICE_NUSD: i64 = 1_000_000_000;

const LIMIT_FIELDS: [&str; 5] = [
    "rpm",
    "tpm",
    "max_concurrent",
    "tool_calls_per_minute",
    "tool_calls_per_day",
];

impl Governance {
    /// Sets a versioned setting as `actor`: the value is validated, stored as a change,
    /// applied, and audited; the answer comes once the audit record is durable.
    pub async fn change(
        &self,
        actor: &str,
        target: Target,
        value: Value,
    ) -> Result<Changed, GovError> {
        self.change_with(actor, "set", target, value).await
    }

    /// Applies again what change `id` set, as a new change.
    pub async fn rollback_change(&self, actor: &str, id: i64) -> Result<Changed, GovError> {
        let (c, target) = self.version(id).await?;
        self.change_with(actor, &format!("rollback to {id}"), target, c.after)
            .await
    }

    /// Restores what change `id` replaced, as a new change.
    pub async fn undo_change(&self, actor: &str, id: i64) -> Result<Changed, GovError> {
        let (c, target) = self.version(id).await?;
        self.change_with(actor, &format!("undo of {id}"), target, c.before)
            .await
    }

    /// Records, after the fact, a change that is not a version (see the module's doc).
    pub async fn record_event(
        &self,
        actor: &str,
        action: &str,
        kind: &str,
        target: Value,
        after: Value,
    ) -> Result<ChangeRecord, GovError> {
        let id = self
            .store()
            .insert_change(&NewChange {
                time_ms: now_ms(),
                actor,
                action,
                kind,
                target: &target.to_string(),
                before: "null",
                after: &after.to_string(),
            })
            .await?;
        self.audit_change(id).await
    }

    /// Changes, newest first: all, of one kind, or of one setting.
    pub async fn changes(
        &self,
        kind: Option<&str>,
        target: Option<&Target>,
        limit: i64,
    ) -> Result<Vec<ChangeRecord>, GovError> {
        let target = target.map(Target::text).transpose()?;
        self.store()
            .changes(ChangeFilter {
                kind,
                target: target.as_deref(),
                pending_before_ms: None,
                limit: limit.clamp(1, MAX_CHANGES_PAGE),
            })
            .await
    }

    pub async fn change_record(&self, id: i64) -> Result<ChangeRecord, GovError> {
        self.store()
            .change(id)
            .await?
            .ok_or_else(|| GovError::NotFound(format!("change {id}")))
    }

    /// Applies and audits the changes a process did not finish (see the module's doc);
    /// returns how many.
    pub async fn finish_interrupted_changes(&self) -> Result<usize, GovError> {
        let pending = self
            .store()
            .changes(ChangeFilter {
                pending_before_ms: Some(now_ms() - INTERRUPTED_AFTER_MS),
                limit: MAX_CHANGES_PAGE,
                ..Default::default()
            })
            .await?;
        for c in pending.iter().rev() {
            if let Ok(target) = serde_json::from_value::<Target>(c.target.clone()) {
                self.apply(&target, &c.after).await?;
            }
            self.audit_change(c.id).await?;
            tracing::warn!(
                "admin change {} ({} by {}) was interrupted; applied and audited now",
                c.id,
                c.kind,
                c.actor
            );
        }
        if !pending.is_empty() {
            self.forget_keys();
        }
        Ok(pending.len())
    }

    async fn version(&self, id: i64) -> Result<(ChangeRecord, Target), GovError> {
        let c = self.change_record(id).await?;
        let target = serde_json::from_value::<Target>(c.target.clone()).map_err(|_| {
            GovError::Invalid(format!(
                "change {id} ({}) is not a version of a setting: only policy, budget, limits \
                 and price changes can be rolled back or undone",
                c.kind
            ))
        })?;
        Ok((c, target))
    }

    async fn change_with(
        &self,
        actor: &str,
        action: &str,
        target: Target,
        value: Value,
    ) -> Result<Changed, GovError> {
        let after = self.checked(&target, value).await?;
        let before = self.current(&target).await?;
        let id = self
            .store()
            .insert_change(&NewChange {
                time_ms: now_ms(),
                actor,
                action,
                kind: target.kind(),
                target: &target.text()?,
                before: &before.to_string(),
                after: &after.to_string(),
            })
            .await?;
        let row_id = match self.apply(&target, &after).await {
            Ok(row_id) => row_id,
            Err(e) => {
                // Not applied: the row must not be applied later by recovery either.
                if let Err(d) = self.store().delete_pending_change(id).await {
                    tracing::error!("admin change {id} failed ({e}) and stays pending: {d}");
                }
                return Err(e);
            }
        };
        self.forget_keys();
        let record = self.audit_change(id).await?;
        Ok(Changed { record, row_id })
    }

    /// Appends a stored change to the audit chain and notes where.
    async fn audit_change(&self, id: i64) -> Result<ChangeRecord, GovError> {
        let mut c = self.change_record(id).await?;
        let record = audit_record(&c);
        let fin = self
            .store()
            .finish(FinishOp {
                settlement: None,
                record,
                content: None,
            })
            .await?;
        self.store().mark_change_audited(id, fin.seq).await?;
        c.audit_seq = Some(fin.seq);
        Ok(c)
    }

    /// The value a change to `target` would set, validated and in its stored form; the
    /// tenant (and key) it names must exist.
    async fn checked(&self, target: &Target, value: Value) -> Result<Value, GovError> {
        if let Some(tenant) = target.tenant() {
            let t = self.tenant(tenant).await?;
            if let Target::Budget { key_id, .. } | Target::Limits { key_id, .. } = target {
                self.check_key_owner(&t, *key_id).await?;
            }
        }
        match target {
            Target::Policy { .. } if value.is_null() => Ok(Value::Null),
            Target::Policy { .. } => {
                let p = serrano_safety::Policy::from_json(&value.to_string())
                    .map_err(|e| GovError::Invalid(format!("invalid policy: {e}")))?;
                serde_json::to_value(&p).map_err(|e| GovError::Invalid(e.to_string()))
            }
            Target::Budget { .. } => match value.as_i64() {
                Some(limit) if limit >= 0 => Ok(json!(limit)),
                _ if value.is_null() => Err(GovError::Invalid(
                    "a budget cannot be removed (its spend would go with it); set its limit \
                     instead"
                        .into(),
                )),
                _ => Err(GovError::Invalid(
                    "a budget limit is a non-negative integer".into(),
                )),
            },
            Target::Limits { .. } => checked_limits(value),
            Target::Price { model, backend } => {
                if [model, backend]
                    .iter()
                    .any(|n| n.is_empty() || n.len() > MAX_NAME_BYTES)
                {
                    return Err(GovError::Invalid(format!(
                        "a price's model and backend are 1 to {MAX_NAME_BYTES} bytes"
                    )));
                }
                checked_price(value)
            }
        }
    }

    /// A setting's value now, in its stored form (`null` for none).
    async fn current(&self, target: &Target) -> Result<Value, GovError> {
        Ok(match target {
            Target::Policy { tenant } => match self.tenant(tenant).await?.policy {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| GovError::Unavailable(format!("a stored policy: {e}")))?,
                None => Value::Null,
            },
            Target::Budget {
                tenant,
                key_id,
                unit,
                period,
            } => self
                .budgets(Some(tenant))
                .await?
                .into_iter()
                .find(|b| b.key_id == key_id.unwrap_or(0) && b.unit == *unit && b.period == *period)
                .map_or(Value::Null, |b| json!(b.limit)),
            Target::Limits { tenant, key_id } => self
                .limits(Some(tenant))
                .await?
                .into_iter()
                .find(|l| l.key_id == key_id.unwrap_or(0) && l.limits != Limits::default())
                .map_or(Value::Null, |l| json!(l.limits)),
            Target::Price { model, backend } => match self.store().price(model, backend).await? {
                Some((input, output)) => price_value(input, output),
                None => Value::Null,
            },
        })
    }

    /// Sets a checked value; returns the id of the row set, where it has one.
    async fn apply(&self, target: &Target, value: &Value) -> Result<Option<i64>, GovError> {
        let store = self.store();
        let tenant_id = match target.tenant() {
            Some(name) => self.tenant(name).await?.id,
            None => 0,
        };
        let bad = || GovError::Invalid(format!("not a {} value: {value}", target.kind()));
        match target {
            Target::Policy { tenant } => {
                let text = (!value.is_null()).then(|| value.to_string());
                if !store.set_policy(tenant, text.as_deref()).await? {
                    return Err(GovError::NotFound(format!("tenant '{tenant}'")));
                }
                Ok(None)
            }
            Target::Budget {
                key_id,
                unit,
                period,
                ..
            } => {
                let limit = value.as_i64().ok_or_else(bad)?;
                let id = store
                    .set_budget(tenant_id, key_id.unwrap_or(0), *unit, *period, limit)
                    .await?;
                Ok(Some(id))
            }
            Target::Limits { key_id, .. } => {
                let limits = match value {
                    Value::Null => Limits::default(),
                    v => serde_json::from_value(v.clone()).map_err(|_| bad())?,
                };
                Ok(Some(
                    store
                        .set_limits(tenant_id, key_id.unwrap_or(0), limits)
                        .await?,
                ))
            }
            Target::Price { model, backend } => {
                if value.is_null() {
                    store.delete_price(model, backend).await?;
                    return Ok(None);
                }
                let nusd = |field: &str| value[field].as_i64().ok_or_else(bad);
                let (input, output) = (
                    nusd("input_nusd_per_token")?,
                    nusd("output_nusd_per_token")?,
                );
                store.set_price(model, backend, input, output).await?;
                Ok(None)
            }
        }
    }
}

/// A price given in dollars per million tokens as the value a [`Target::Price`] change sets.
pub fn price_from_usd(input_per_m: f64, output_per_m: f64) -> Result<Value, GovError> {
    let (input, output) = crate::nusd_prices(input_per_m, output_per_m)?;
    Ok(price_value(input, output))
}

/// A price's stored value.
pub fn price_value(input_nusd_per_token: i64, output_nusd_per_token: i64) -> Value {
    json!({
        "input_nusd_per_token": input_nusd_per_token,
        "output_nusd_per_token": output_nusd_per_token,
    })
}

fn checked_limits(value: Value) -> Result<Value, GovError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let Some(fields) = value.as_object() else {
        return Err(GovError::Invalid("limits are an object".into()));
    };
    if let Some(unknown) = fields.keys().find(|k| !LIMIT_FIELDS.contains(&k.as_str())) {
        return Err(GovError::Invalid(format!(
            "unknown limit '{unknown}' (use {})",
            LIMIT_FIELDS.join(", ")
        )));
    }
    let limits: Limits =
        serde_json::from_value(value).map_err(|e| GovError::Invalid(format!("limits: {e}")))?;
    let all = [
        limits.rpm,
        limits.tpm,
        limits.max_concurrent,
        limits.tool_calls_per_minute,
        limits.tool_calls_per_day,
    ];
    if all.iter().flatten().any(|v| *v < 0) {
        return Err(GovError::Invalid("limits cannot be negative".into()));
    }
    if limits == Limits::default() {
        return Ok(Value::Null);
    }
    Ok(json!(limits))
}

fn checked_price(value: Value) -> Result<Value, GovError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let fields = value.as_object().map(|o| o.len());
    let nusd = |field: &str| {
        value[field]
            .as_i64()
            .filter(|n| (0..=MAX_PRICE_NUSD).contains(n))
    };
    match (
        fields,
        nusd("input_nusd_per_token"),
        nusd("output_nusd_per_token"),
    ) {
        (Some(2), Some(input), Some(output)) => Ok(price_value(input, output)),
        _ => Err(GovError::Invalid(format!(
            "a price is {{\"input_nusd_per_token\": N, \"output_nusd_per_token\": N}}, each \
             0 to {MAX_PRICE_NUSD}"
        ))),
    }
}

/// The audit record of a change: `method` CHANGE, `endpoint` the kind, `key` the actor.
fn audit_record(c: &ChangeRecord) -> AuditRecord {
    let tenant = c.target["tenant"].as_str().map(str::to_string);
    let mut record = AuditRecord {
        request_id: format!("change-{}", c.id),
        method: "CHANGE".into(),
        endpoint: c.kind.clone(),
        tenant,
        key: Some(c.actor.clone()),
        status: 200,
        change: Some(json!({
            "id": c.id,
            "action": c.action,
            "target": shown(&c.target),
            "before": shown(&c.before),
            "after": shown(&c.after),
        })),
        ..Default::default()
    };
    record.bound(0, 0);
    record
}

/// A value as its audit record keeps it: whole, or its digest when long.
fn shown(v: &Value) -> Value {
    let text = v.to_string();
    if text.len() <= MAX_CHANGE_VALUE_BYTES {
        return v.clone();
    }
    json!({"sha256": sha256_hex(&text), "bytes": text.len()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GovConfig;

    async fn gov() -> (tempfile::TempDir, Governance) {
        let dir = tempfile::tempdir().unwrap();
        let gov = Governance::open(GovConfig::new(dir.path().join("g.db")))
            .await
            .unwrap();
        gov.create_tenant("acme", crate::Retention::None)
            .await
            .unwrap();
        (dir, gov)
    }

    fn policy() -> Target {
        Target::Policy {
            tenant: "acme".into(),
        }
    }

    #[tokio::test]
    async fn a_change_is_stored_applied_and_audited_with_before_and_after() {
        let (_dir, gov) = gov().await;
        let block = json!({"injection": "block"});
        let first = gov
            .change("cli:ops@h", policy(), block.clone())
            .await
            .unwrap();
        assert_eq!(first.record.before, Value::Null);
        assert!(gov.tenant("acme").await.unwrap().policy.is_some());
        let second = gov
            .change("sk-srn-ab", policy(), Value::Null)
            .await
            .unwrap();
        assert_eq!(second.record.after, Value::Null);
        assert_eq!(gov.tenant("acme").await.unwrap().policy, None);
        assert_eq!(second.record.before, first.record.after);
        // Each change is a chain record naming its actor and values.
        let records = gov.audit_records(0, 10).await.unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key.as_deref(), Some("cli:ops@h"));
        assert_eq!(records[0].tenant.as_deref(), Some("acme"));
        assert_eq!(
            records[0].change.as_ref().unwrap()["after"],
            first.record.after
        );
        assert_eq!(Some(records[1].seq), second.record.audit_seq);
        assert!(gov.verify_audit().await.unwrap().ok);
    }

    #[tokio::test]
    async fn rollback_applies_a_version_again_and_undo_its_predecessor() {
        let (_dir, gov) = gov().await;
        let limits = Target::Limits {
            tenant: "acme".into(),
            key_id: None,
        };
        let a = gov
            .change("a", limits.clone(), json!({"rpm": 5}))
            .await
            .unwrap();
        gov.change("a", limits.clone(), json!({"rpm": 9, "tpm": 100}))
            .await
            .unwrap();
        let back = gov.rollback_change("b", a.record.id).await.unwrap();
        assert_eq!(back.record.action, format!("rollback to {}", a.record.id));
        assert_eq!(gov.limits(Some("acme")).await.unwrap()[0].limits.tpm, None);
        assert_eq!(
            gov.limits(Some("acme")).await.unwrap()[0].limits.rpm,
            Some(5)
        );
        gov.undo_change("b", a.record.id).await.unwrap();
        assert_eq!(
            gov.limits(Some("acme")).await.unwrap()[0].limits,
            Limits::default()
        );
        let history = gov.changes(None, Some(&limits), 10).await.unwrap();
        assert_eq!(history.len(), 4);
        assert_eq!(history[0].after, Value::Null, "newest first");
        // An event is not a version.
        let ev = gov
            .record_event("a", "create", "tenant", json!({"tenant": "x"}), json!({}))
            .await
            .unwrap();
        let refused = gov.rollback_change("a", ev.id).await;
        assert!(matches!(refused, Err(GovError::Invalid(_))), "{refused:?}");
    }

    #[tokio::test]
    async fn invalid_values_change_nothing() {
        let (_dir, gov) = gov().await;
        let budget = Target::Budget {
            tenant: "acme".into(),
            key_id: None,
            unit: BudgetUnit::Tokens,
            period: BudgetPeriod::Day,
        };
        let price = Target::Price {
            model: "m".into(),
            backend: "local".into(),
        };
        let limits = Target::Limits {
            tenant: "acme".into(),
            key_id: None,
        };
        let bad = [
            (budget.clone(), json!(-1)),
            (budget.clone(), Value::Null),
            (price.clone(), json!({"input_nusd_per_token": 1})),
            (
                price,
                json!({"input_nusd_per_token": 1, "output_nusd_per_token": -2}),
            ),
            (limits.clone(), json!({"rpm": 1, "burst": 2})),
            (limits, json!({"rpm": -1})),
            (policy(), json!({"no_such_filter": true})),
            (
                Target::Policy {
                    tenant: "nobody".into(),
                },
                Value::Null,
            ),
        ];
        for (target, value) in bad {
            assert!(gov.change("a", target, value).await.is_err());
        }
        assert!(gov.changes(None, None, 10).await.unwrap().is_empty());
        assert!(gov.audit_records(0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_interrupted_change_is_applied_and_audited_later() {
        let (_dir, gov) = gov().await;
        let price = Target::Price {
            model: "m".into(),
            backend: "local".into(),
        };
        // What a process that died after writing the row left behind.
        let id = gov
            .store()
            .insert_change(&NewChange {
                time_ms: now_ms() - 2 * INTERRUPTED_AFTER_MS,
                actor: "cli:ops@h",
                action: "set",
                kind: "price",
                target: &price.text().unwrap(),
                before: "null",
                after: &price_value(3, 4).to_string(),
            })
            .await
            .unwrap();
        assert_eq!(gov.finish_interrupted_changes().await.unwrap(), 1);
        assert_eq!(gov.store().price("m", "local").await.unwrap(), Some((3, 4)));
        assert_eq!(gov.change_record(id).await.unwrap().audit_seq, Some(1));
        assert_eq!(gov.finish_interrupted_changes().await.unwrap(), 0);
    }

    #[test]
    fn a_long_value_is_audited_as_its_digest() {
        let long = json!({"x": "y".repeat(MAX_CHANGE_VALUE_BYTES)});
        let record = audit_record(&ChangeRecord {
            id: 1,
            time_ms: 0,
            actor: "a".into(),
            action: "set".into(),
            kind: "policy".into(),
            target: json!({"kind": "policy", "tenant": "t"}),
            before: Value::Null,
            after: long.clone(),
            audit_seq: None,
        });
        let change = record.change.unwrap();
        assert_eq!(change["after"]["sha256"], sha256_hex(&long.to_string()));
        assert_eq!(change["before"], Value::Null);
    }
}
