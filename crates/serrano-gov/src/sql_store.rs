//! The [`Store`] of a SQL database, written once for SQLite (`sqlite.rs`) and PostgreSQL
//! (`pg.rs`): every method whose statements both databases run alike is here, over [`sql`]'s
//! shared statements. What differs (the request path's reserve and finish, the durability
//! barrier, how config versions are numbered) each store gives as a [`SqlStore`].
//!
//! [`sql`]: crate::sql

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::{Pool, Transaction};

use crate::audit::{ChainRow, Retention};
use crate::checkpoint::Checkpoint;
use crate::error::GovError;
use crate::keys::Role;
use crate::rate::RateInfo;
use crate::sql::{parse_models, usage_sql, Arg, Cols, Db};
use crate::storage::{
    AuditHead, ChangeFilter, FinishOp, Finished, KeyRow, ReserveOp, Store, StoredKey, UsageKey,
};
use crate::types::{
    BudgetInfo, BudgetPeriod, BudgetUnit, ChangeRecord, ConfigEvent, ConfigVersion, KeyInfo,
    LedgerState, LimitInfo, Limits, NewChange, TenantInfo, UsageRow,
};

/// A config text the first time it is recorded; the store numbers it.
#[derive(Debug, Clone, Copy)]
pub struct NewConfig<'a> {
    pub hash: &'a str,
    pub source: &'a str,
    pub author: &'a str,
    pub now_ms: i64,
}

/// A store over a sqlx pool: [`Store`] comes with it (below). `pub` because that public impl
/// names it; its module is private, so no other crate can name or implement it.
#[async_trait]
pub trait SqlStore: Send + Sync + 'static {
    type Db: Db;
    /// [`Store::kind`].
    const KIND: &'static str;
    /// What makes a read transaction one snapshot where a plain one is not (PostgreSQL's
    /// default isolation gives each statement its own); `None` for SQLite, whose read
    /// transactions are snapshots.
    const SNAPSHOT: Option<&'static str>;

    fn pool(&self) -> &Pool<Self::Db>;
    /// [`Store::reserve`].
    async fn reserve_request(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError>;
    /// [`Store::finish`].
    async fn finish_request(&self, op: FinishOp) -> Result<Finished, GovError>;
    /// [`Store::flush`].
    async fn flush_writes(&self);
    /// [`Store::write_queue`].
    fn write_queue(&self) -> Option<(usize, usize)> {
        None
    }
    /// The version of `config` (found by its hash, or newly numbered and stored) inside the
    /// transaction that then records the switch to it.
    async fn config_version_of(
        tx: &mut Transaction<'static, Self::Db>,
        config: NewConfig<'_>,
    ) -> Result<i64, GovError>;

    /// Runs a statement on a connection from the pool; rows affected.
    fn execute<'e>(
        &'e self,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>> {
        Box::pin(async move {
            let mut conn = self.pool().acquire().await?;
            Self::Db::execute(&mut conn, sql, args).await
        })
    }
    /// Every row a statement returns, run on a connection from the pool.
    fn fetch_all<'e>(
        &'e self,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<Vec<Row<Self>>, sqlx::Error>> {
        Box::pin(async move {
            let mut conn = self.pool().acquire().await?;
            Self::Db::fetch_all(&mut conn, sql, args).await
        })
    }
    /// The first row a statement returns, if any: for statements that return at most one.
    fn fetch_optional<'e>(
        &'e self,
        sql: &'e str,
        args: &'e [Arg<'e>],
    ) -> BoxFuture<'e, Result<Option<Row<Self>>, sqlx::Error>> {
        Box::pin(async move { Ok(self.fetch_all(sql, args).await?.into_iter().next()) })
    }
}

/// A row of a store's database.
type Row<S> = <<S as SqlStore>::Db as sqlx::Database>::Row;

#[async_trait]
impl<S: SqlStore> Store for S {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    async fn insert_tenant(
        &self,
        name: &str,
        retention: Retention,
        now_ms: i64,
    ) -> Result<bool, GovError> {
        let args = [
            Arg::Text(name),
            Arg::Text(retention.as_str()),
            Arg::Int(now_ms),
        ];
        let n = self
            .execute(
                "INSERT INTO tenants (name, retention, created_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                &args,
            )
            .await?;
        Ok(n == 1)
    }

    async fn tenant(&self, name: &str) -> Result<Option<TenantInfo>, GovError> {
        let sql = "SELECT id, name, retention, created_ms, policy FROM tenants WHERE name = ?1";
        let row = self.fetch_optional(sql, &[Arg::Text(name)]).await?;
        Ok(row.as_ref().map(tenant_row).transpose()?)
    }

    async fn tenants(&self) -> Result<Vec<TenantInfo>, GovError> {
        let sql = "SELECT id, name, retention, created_ms, policy FROM tenants ORDER BY id";
        let rows = self.fetch_all(sql, &[]).await?;
        Ok(rows.iter().map(tenant_row).collect::<Result<_, _>>()?)
    }

    async fn set_policy(&self, tenant: &str, policy: Option<&str>) -> Result<bool, GovError> {
        let sql = "UPDATE tenants SET policy = ?2 WHERE name = ?1";
        let n = self
            .execute(sql, &[Arg::Text(tenant), Arg::OptText(policy)])
            .await?;
        Ok(n == 1)
    }

    async fn set_retention(&self, tenant: &str, retention: Retention) -> Result<bool, GovError> {
        let sql = "UPDATE tenants SET retention = ?2 WHERE name = ?1";
        let n = self
            .execute(sql, &[Arg::Text(tenant), Arg::Text(retention.as_str())])
            .await?;
        Ok(n == 1)
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<StoredKey>, GovError> {
        let rows = self
            .fetch_all(
                "SELECT k.id AS key_id, k.hash, k.prefix, k.role, k.models, k.grant_interactive,
                        k.expires_ms, k.revoked_ms, t.id, t.name, t.retention, t.created_ms, t.policy
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = ?1",
                &[Arg::Text(prefix)],
            )
            .await?;
        Ok(rows.iter().map(stored_key_row).collect::<Result<_, _>>()?)
    }

    async fn key_hash_exists(&self, hash: &[u8]) -> Result<bool, GovError> {
        let sql = "SELECT id FROM api_keys WHERE hash = ?1";
        Ok(self
            .fetch_optional(sql, &[Arg::Bytes(hash)])
            .await?
            .is_some())
    }

    async fn active_admin_keys(&self) -> Result<i64, GovError> {
        let sql = "SELECT COUNT(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_ms IS NULL";
        let rows = self.fetch_all(sql, &[]).await?;
        count(&rows)
    }

    async fn insert_key(&self, k: &KeyRow) -> Result<i64, GovError> {
        let models = k
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        let args = [
            Arg::Int(k.tenant_id),
            Arg::Text(&k.name),
            Arg::Text(&k.prefix),
            Arg::Bytes(&k.hash),
            Arg::Text(k.role.as_str()),
            Arg::OptText(models.as_deref()),
            Arg::Int(k.created_ms),
            Arg::OptInt(k.expires_ms),
            Arg::Int(i64::from(k.grant_interactive)),
        ];
        let rows = self
            .fetch_all(
                "INSERT INTO api_keys (tenant_id, name, prefix, hash, role, models, created_ms,
                                       expires_ms, grant_interactive)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
                &args,
            )
            .await?;
        returned_id(&rows)
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, GovError> {
        let rows = self
            .fetch_all(
                "SELECT k.id, t.name AS tenant, k.name, k.prefix, k.role, k.models,
                        k.grant_interactive, k.created_ms, k.expires_ms, k.revoked_ms
                 FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
                 WHERE CAST(?1 AS TEXT) IS NULL OR t.name = ?1 ORDER BY k.id",
                &[Arg::OptText(tenant)],
            )
            .await?;
        Ok(rows.iter().map(key_info_row).collect::<Result<_, _>>()?)
    }

    async fn revoke_key(&self, id: i64, now_ms: i64) -> Result<bool, GovError> {
        let sql = "UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL";
        let n = self.execute(sql, &[Arg::Int(id), Arg::Int(now_ms)]).await?;
        Ok(n == 1)
    }

    async fn key_tenant(&self, id: i64) -> Result<Option<i64>, GovError> {
        let sql = "SELECT tenant_id FROM api_keys WHERE id = ?1";
        let row = self.fetch_optional(sql, &[Arg::Int(id)]).await?;
        Ok(row.map(|r| r.int("tenant_id")).transpose()?)
    }

    async fn set_budget(
        &self,
        tenant_id: i64,
        key_id: i64,
        unit: BudgetUnit,
        period: BudgetPeriod,
        limit: i64,
    ) -> Result<i64, GovError> {
        let args = [
            Arg::Int(tenant_id),
            Arg::Int(key_id),
            Arg::Text(unit.as_str()),
            Arg::Text(period.as_str()),
            Arg::Int(limit),
        ];
        let rows = self
            .fetch_all(
                "INSERT INTO budgets (tenant_id, key_id, unit, period, limit_amount)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (tenant_id, key_id, unit, period)
                 DO UPDATE SET limit_amount = excluded.limit_amount
                 RETURNING id",
                &args,
            )
            .await?;
        returned_id(&rows)
    }

    async fn budgets(
        &self,
        tenant: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<BudgetInfo>, GovError> {
        let rows = self
            .fetch_all(
                "SELECT b.id, t.name AS tenant, b.key_id, b.unit, b.period, b.limit_amount
                 FROM budgets b JOIN tenants t ON t.id = b.tenant_id
                 WHERE CAST(?1 AS TEXT) IS NULL OR t.name = ?1 ORDER BY b.id",
                &[Arg::OptText(tenant)],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id = r.int("id")?;
            let period = BudgetPeriod::parse(&r.text("period")?).unwrap_or(BudgetPeriod::Total);
            let window = period.key(now_ms);
            let usage = self
                .fetch_optional(
                    "SELECT spent, reserved FROM budget_usage
                     WHERE budget_id = ?1 AND period_key = ?2",
                    &[Arg::Int(id), Arg::Text(&window)],
                )
                .await?;
            let (spent, reserved) = match usage {
                Some(u) => (u.int("spent")?, u.int("reserved")?),
                None => (0, 0),
            };
            out.push(BudgetInfo {
                id,
                tenant: r.text("tenant")?,
                key_id: r.int("key_id")?,
                unit: BudgetUnit::parse(&r.text("unit")?).unwrap_or(BudgetUnit::Tokens),
                period,
                limit: r.int("limit_amount")?,
                spent,
                reserved,
            });
        }
        Ok(out)
    }

    async fn set_limits(&self, tenant_id: i64, key_id: i64, l: Limits) -> Result<i64, GovError> {
        let args = [
            Arg::Int(tenant_id),
            Arg::Int(key_id),
            Arg::OptInt(l.rpm),
            Arg::OptInt(l.tpm),
            Arg::OptInt(l.max_concurrent),
            Arg::OptInt(l.tool_calls_per_minute),
            Arg::OptInt(l.tool_calls_per_day),
        ];
        let rows = self
            .fetch_all(
                "INSERT INTO limits (tenant_id, key_id, rpm, tpm, max_concurrent,
                                     tool_calls_per_minute, tool_calls_per_day)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (tenant_id, key_id) DO UPDATE SET rpm = excluded.rpm,
                     tpm = excluded.tpm, max_concurrent = excluded.max_concurrent,
                     tool_calls_per_minute = excluded.tool_calls_per_minute,
                     tool_calls_per_day = excluded.tool_calls_per_day
                 RETURNING id",
                &args,
            )
            .await?;
        returned_id(&rows)
    }

    async fn limits(&self, tenant: Option<&str>) -> Result<Vec<LimitInfo>, GovError> {
        let rows = self
            .fetch_all(
                "SELECT l.id, t.name AS tenant, l.key_id, l.rpm, l.tpm, l.max_concurrent,
                        l.tool_calls_per_minute, l.tool_calls_per_day
                 FROM limits l JOIN tenants t ON t.id = l.tenant_id
                 WHERE CAST(?1 AS TEXT) IS NULL OR t.name = ?1 ORDER BY l.id",
                &[Arg::OptText(tenant)],
            )
            .await?;
        Ok(rows.iter().map(limit_info_row).collect::<Result<_, _>>()?)
    }

    async fn set_price(
        &self,
        model: &str,
        backend: &str,
        input_nusd: i64,
        output_nusd: i64,
    ) -> Result<(), GovError> {
        let args = [
            Arg::Text(model),
            Arg::Text(backend),
            Arg::Int(input_nusd),
            Arg::Int(output_nusd),
        ];
        self.execute(
            "INSERT INTO prices (model, backend, input_nusd, output_nusd) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (model, backend) DO UPDATE
             SET input_nusd = excluded.input_nusd, output_nusd = excluded.output_nusd",
            &args,
        )
        .await?;
        Ok(())
    }

    async fn price(&self, model: &str, backend: &str) -> Result<Option<(i64, i64)>, GovError> {
        let row = self
            .fetch_optional(
                "SELECT input_nusd, output_nusd FROM prices WHERE model = ?1 AND backend = ?2",
                &[Arg::Text(model), Arg::Text(backend)],
            )
            .await?;
        let pair = |r: Row<S>| Ok::<_, sqlx::Error>((r.int("input_nusd")?, r.int("output_nusd")?));
        Ok(row.map(pair).transpose()?)
    }

    async fn delete_price(&self, model: &str, backend: &str) -> Result<bool, GovError> {
        let n = self
            .execute(
                "DELETE FROM prices WHERE model = ?1 AND backend = ?2",
                &[Arg::Text(model), Arg::Text(backend)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn reserve(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        self.reserve_request(op).await
    }

    async fn finish(&self, op: FinishOp) -> Result<Finished, GovError> {
        self.finish_request(op).await
    }

    async fn flush(&self) {
        self.flush_writes().await
    }

    fn write_queue(&self) -> Option<(usize, usize)> {
        SqlStore::write_queue(self)
    }

    async fn usage(&self, group_by: &[UsageKey]) -> Result<Vec<UsageRow>, GovError> {
        let rows = self.fetch_all(&usage_sql(group_by), &[]).await?;
        Ok(rows.iter().map(usage_row).collect::<Result<_, _>>()?)
    }

    async fn ledger_state(&self) -> Result<LedgerState, GovError> {
        let sql = "SELECT COUNT(*) AS n FROM requests WHERE state = 'reserved'";
        let open = count(&self.fetch_all(sql, &[]).await?)?;
        let totals = self
            .fetch_all(
                "SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT) AS reserved,
                        CAST(COALESCE(SUM(spent), 0) AS BIGINT) AS spent
                 FROM budget_usage",
                &[],
            )
            .await?;
        let t = only(&totals)?;
        Ok(LedgerState {
            open_requests: open,
            reserved_total: t.int("reserved")?,
            spent_total: t.int("spent")?,
        })
    }

    async fn audit_chain_page(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<(Vec<ChainRow>, Option<AuditHead>), GovError> {
        // One snapshot, so the head matches the rows while writers (the SQLite writer, other
        // replicas) append.
        let mut tx = self.pool().begin().await?;
        if let Some(snapshot) = S::SNAPSHOT {
            S::Db::execute(&mut tx, snapshot, &[]).await?;
        }
        let sql =
            "SELECT seq, record, prev_hash, hash FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2";
        let args = [Arg::Int(after_seq), Arg::Int(limit)];
        let rows = S::Db::fetch_all(&mut tx, sql, &args).await?;
        let rows = rows.iter().map(chain_row).collect::<Result<_, _>>()?;
        let head = S::Db::fetch_all(&mut tx, HEAD_SQL, &[]).await?;
        let head = head.first().map(head_row).transpose()?;
        tx.commit().await?;
        Ok((rows, head))
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, GovError> {
        let head = self.fetch_optional(HEAD_SQL, &[]).await?;
        Ok(head.as_ref().map(head_row).transpose()?)
    }

    async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<bool, GovError> {
        let args = [
            Arg::Int(cp.seq),
            Arg::Text(&cp.hash),
            Arg::Int(cp.time_ms),
            Arg::Text(&cp.public_key),
            Arg::Text(&cp.signature),
        ];
        let n = self
            .execute(
                "INSERT INTO audit_checkpoints (seq, hash, time_ms, public_key, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                &args,
            )
            .await?;
        Ok(n == 1)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, GovError> {
        let sql =
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints ORDER BY seq";
        let rows = self.fetch_all(sql, &[]).await?;
        Ok(rows.iter().map(checkpoint_row).collect::<Result<_, _>>()?)
    }

    async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<String>, GovError> {
        let sql = "SELECT record FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2";
        let rows = self
            .fetch_all(sql, &[Arg::Int(after_seq), Arg::Int(limit)])
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.text("record"))
            .collect::<Result<_, _>>()?)
    }

    async fn erase_content(&self, tenant_id: i64) -> Result<u64, GovError> {
        let sql = "DELETE FROM audit_content WHERE tenant_id = ?1";
        Ok(self.execute(sql, &[Arg::Int(tenant_id)]).await?)
    }

    async fn audit_content(
        &self,
        seq: i64,
    ) -> Result<Option<(String, Option<String>, Option<String>)>, GovError> {
        let sql = "SELECT retention, prompt, completion FROM audit_content WHERE seq = ?1";
        let row = self.fetch_optional(sql, &[Arg::Int(seq)]).await?;
        let content = |r: &Row<S>| -> Result<_, sqlx::Error> {
            Ok((
                r.text("retention")?,
                r.opt_text("prompt")?,
                r.opt_text("completion")?,
            ))
        };
        Ok(row.as_ref().map(content).transpose()?)
    }

    async fn record_config(
        &self,
        hash: &str,
        source: &str,
        author: &str,
        action: &str,
        now_ms: i64,
    ) -> Result<u64, GovError> {
        let mut tx = self.pool().begin().await?;
        let config = NewConfig {
            hash,
            source,
            author,
            now_ms,
        };
        let version = S::config_version_of(&mut tx, config).await?;
        let args = [
            Arg::Int(version),
            Arg::Int(now_ms),
            Arg::Text(author),
            Arg::Text(action),
        ];
        S::Db::execute(
            &mut tx,
            "INSERT INTO config_events (version, time_ms, author, action) VALUES (?1, ?2, ?3, ?4)",
            &args,
        )
        .await?;
        tx.commit().await?;
        Ok(version as u64)
    }

    async fn config_versions(&self) -> Result<Vec<ConfigVersion>, GovError> {
        let sql = "SELECT version, hash, created_ms, author FROM config_versions ORDER BY version";
        let rows = self.fetch_all(sql, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| version_row(r, false))
            .collect::<Result<_, _>>()?)
    }

    async fn config_events(&self) -> Result<Vec<ConfigEvent>, GovError> {
        let sql = "SELECT version, time_ms, author, action FROM config_events ORDER BY id";
        let rows = self.fetch_all(sql, &[]).await?;
        Ok(rows.iter().map(event_row).collect::<Result<_, _>>()?)
    }

    async fn config_version(&self, version: u64) -> Result<Option<ConfigVersion>, GovError> {
        let row = self
            .fetch_optional(
                "SELECT version, hash, created_ms, author, source FROM config_versions
                 WHERE version = ?1",
                &[Arg::Int(i64::try_from(version).unwrap_or(i64::MAX))],
            )
            .await?;
        Ok(row.as_ref().map(|r| version_row(r, true)).transpose()?)
    }
    async fn insert_change(&self, c: &NewChange<'_>) -> Result<i64, GovError> {
        let args = [
            Arg::Int(c.time_ms),
            Arg::Text(c.actor),
            Arg::Text(c.action),
            Arg::Text(c.kind),
            Arg::Text(c.target),
            Arg::Text(c.before),
            Arg::Text(c.after),
        ];
        let rows = self
            .fetch_all(
                "INSERT INTO admin_changes (time_ms, actor, action, kind, target, before_value,
                                            after_value)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                &args,
            )
            .await?;
        returned_id(&rows)
    }

    async fn mark_change_audited(&self, id: i64, seq: u64) -> Result<(), GovError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.execute(
            "UPDATE admin_changes SET audit_seq = ?2 WHERE id = ?1",
            &[Arg::Int(id), Arg::Int(seq)],
        )
        .await?;
        Ok(())
    }

    async fn delete_pending_change(&self, id: i64) -> Result<(), GovError> {
        self.execute(
            "DELETE FROM admin_changes WHERE id = ?1 AND audit_seq IS NULL",
            &[Arg::Int(id)],
        )
        .await?;
        Ok(())
    }

    async fn change(&self, id: i64) -> Result<Option<ChangeRecord>, GovError> {
        let sql = format!("{CHANGE_COLUMNS} WHERE id = ?1");
        let row = self.fetch_optional(&sql, &[Arg::Int(id)]).await?;
        row.as_ref().map(change_row).transpose()
    }

    async fn changes(&self, f: ChangeFilter<'_>) -> Result<Vec<ChangeRecord>, GovError> {
        let sql = format!(
            "{CHANGE_COLUMNS}
             WHERE (CAST(?1 AS TEXT) IS NULL OR kind = ?1)
               AND (CAST(?2 AS TEXT) IS NULL OR target = ?2)
               AND (CAST(?3 AS BIGINT) IS NULL OR (audit_seq IS NULL AND time_ms < ?3))
             ORDER BY id DESC LIMIT ?4"
        );
        let args = [
            Arg::OptText(f.kind),
            Arg::OptText(f.target),
            Arg::OptInt(f.pending_before_ms),
            Arg::Int(f.limit),
        ];
        let rows = self.fetch_all(&sql, &args).await?;
        rows.iter().map(change_row).collect()
    }
}

const CHANGE_COLUMNS: &str = "SELECT id, time_ms, actor, action, kind, target, before_value,
                                     after_value, audit_seq
                              FROM admin_changes";

/// A stored change; its JSON columns were written by `Governance` and parse, or the row is
/// reported as damaged.
fn change_row(r: &impl Cols) -> Result<ChangeRecord, GovError> {
    let json = |col: &str| -> Result<serde_json::Value, GovError> {
        let text = r.text(col)?;
        serde_json::from_str(&text)
            .map_err(|e| GovError::Unavailable(format!("admin change column {col}: {e}")))
    };
    Ok(ChangeRecord {
        id: r.int("id")?,
        time_ms: r.int("time_ms")?,
        actor: r.text("actor")?,
        action: r.text("action")?,
        kind: r.text("kind")?,
        target: json("target")?,
        before: json("before_value")?,
        after: json("after_value")?,
        audit_seq: r.opt_int("audit_seq")?.map(|s| s as u64),
    })
}

/// The chain's head, `None` while the chain is empty (SQLite has no row then, PostgreSQL's
/// stands at 0).
const HEAD_SQL: &str = "SELECT seq, hash FROM audit_head WHERE id = 1 AND seq > 0";

/// The one row a statement returns.
fn only<R>(rows: &[R]) -> Result<&R, GovError> {
    rows.first()
        .ok_or_else(|| GovError::Unavailable("a statement returned no row".into()))
}

/// The `id` an `INSERT ... RETURNING id` returned.
fn returned_id(rows: &[impl Cols]) -> Result<i64, GovError> {
    Ok(only(rows)?.int("id")?)
}

/// The `n` of a `SELECT COUNT(*) AS n`.
fn count(rows: &[impl Cols]) -> Result<i64, GovError> {
    Ok(only(rows)?.int("n")?)
}

fn tenant_row(r: &impl Cols) -> Result<TenantInfo, sqlx::Error> {
    Ok(TenantInfo {
        id: r.int("id")?,
        name: r.text("name")?,
        retention: Retention::parse(&r.text("retention")?).unwrap_or_default(),
        created_ms: r.int("created_ms")?,
        policy: r.opt_text("policy")?,
    })
}

fn role(r: &impl Cols) -> Result<Role, sqlx::Error> {
    Ok(Role::parse(&r.text("role")?).unwrap_or(Role::Inference))
}

fn stored_key_row(r: &impl Cols) -> Result<StoredKey, sqlx::Error> {
    Ok(StoredKey {
        id: r.int("key_id")?,
        hash: r.bytes("hash")?,
        prefix: r.text("prefix")?,
        role: role(r)?,
        models: parse_models(r.opt_text("models")?),
        grant_interactive: r.int("grant_interactive")? != 0,
        expires_ms: r.opt_int("expires_ms")?,
        revoked_ms: r.opt_int("revoked_ms")?,
        tenant: tenant_row(r)?,
    })
}

fn key_info_row(r: &impl Cols) -> Result<KeyInfo, sqlx::Error> {
    Ok(KeyInfo {
        id: r.int("id")?,
        tenant: r.text("tenant")?,
        name: r.text("name")?,
        prefix: r.text("prefix")?,
        role: role(r)?,
        models: parse_models(r.opt_text("models")?),
        grant_interactive: r.int("grant_interactive")? != 0,
        created_ms: r.int("created_ms")?,
        expires_ms: r.opt_int("expires_ms")?,
        revoked_ms: r.opt_int("revoked_ms")?,
    })
}

fn limit_info_row(r: &impl Cols) -> Result<LimitInfo, sqlx::Error> {
    Ok(LimitInfo {
        id: r.int("id")?,
        tenant: r.text("tenant")?,
        key_id: r.int("key_id")?,
        limits: Limits {
            rpm: r.opt_int("rpm")?,
            tpm: r.opt_int("tpm")?,
            max_concurrent: r.opt_int("max_concurrent")?,
            tool_calls_per_minute: r.opt_int("tool_calls_per_minute")?,
            tool_calls_per_day: r.opt_int("tool_calls_per_day")?,
        },
    })
}

fn usage_row(r: &impl Cols) -> Result<UsageRow, sqlx::Error> {
    Ok(UsageRow {
        tenant: r.opt_text("tenant")?,
        key: r.opt_text("key_prefix")?,
        model: r.opt_text("model")?,
        day: r.opt_text("day")?,
        backend: r.opt_text("backend")?,
        requests: r.int("requests")?,
        prompt_tokens: r.int("p")?,
        completion_tokens: r.int("c")?,
        cost_usd: r.int("cost")? as f64 / crate::NUSD_PER_USD,
    })
}

fn chain_row(r: &impl Cols) -> Result<ChainRow, sqlx::Error> {
    Ok(ChainRow {
        seq: r.int("seq")?,
        record: r.text("record")?,
        prev_hash: r.text("prev_hash")?,
        hash: r.text("hash")?,
    })
}

fn head_row(r: &impl Cols) -> Result<AuditHead, sqlx::Error> {
    Ok((r.int("seq")?, r.text("hash")?))
}

fn checkpoint_row(r: &impl Cols) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        seq: r.int("seq")?,
        hash: r.text("hash")?,
        time_ms: r.int("time_ms")?,
        public_key: r.text("public_key")?,
        signature: r.text("signature")?,
    })
}

fn version_row(r: &impl Cols, with_source: bool) -> Result<ConfigVersion, sqlx::Error> {
    Ok(ConfigVersion {
        version: r.int("version")? as u64,
        hash: r.text("hash")?,
        created_ms: r.int("created_ms")?,
        author: r.text("author")?,
        source: if with_source {
            Some(r.text("source")?)
        } else {
            None
        },
    })
}

fn event_row(r: &impl Cols) -> Result<ConfigEvent, sqlx::Error> {
    Ok(ConfigEvent {
        version: r.int("version")? as u64,
        time_ms: r.int("time_ms")?,
        author: r.text("author")?,
        action: r.text("action")?,
    })
}
