//! The SQLite [`Store`]: one database file (WAL, mode 0600) per process group; a sqlx pool
//! (`synchronous=FULL`) for reads and admin writes, and one writer thread (`writer.rs`) for the
//! ledger and the audit log, which fsyncs the WAL itself before an audit record is reported
//! written. Several processes on one machine may share the file: SQLite's
//! locks make their reservations atomic and their audit chain one sequence.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::oneshot;

use crate::audit::{ChainRow, Retention};
use crate::checkpoint::Checkpoint;
use crate::config::GovConfig;
use crate::error::GovError;
use crate::keys::Role;
use crate::rate::RateInfo;
use crate::storage::{
    AuditHead, FinishOp, Finished, KeyRow, ReserveOp, Store, StoredKey, UsageKey,
};
use crate::types::{
    BudgetInfo, BudgetPeriod, BudgetUnit, ConfigEvent, ConfigVersion, KeyInfo, LedgerState,
    LimitInfo, Limits, TenantInfo, UsageRow,
};
use crate::writer::{self, Op};

/// WAL bytes past which the writer checkpoints itself: 16 MiB, about 500 requests.
const WAL_BACKSTOP_BYTES: i64 = 16 << 20;
/// Page size of a new database. SQLite writes every page a transaction touches to the WAL,
/// and an audited request touches ~16 (ledger rows, indexes, the audit record, the head):
/// with 4 KiB pages that was ~106 KB written per request, with 1 KiB ~32 KB (measured with
/// the gateway benchmark; latency and CPU unchanged at low rates, fewer stalls at 2,000
/// req/s). A database keeps the page size it was created with.
const PAGE_SIZE: u32 = 1024;
/// Prepared statements the writer keeps (more than it uses).
const STATEMENT_CACHE: usize = 64;
/// Ledger and audit writes that may wait for the writer. Past it, a new request waits at most
/// `busy_timeout` for room, then fails closed (503); an audit record always waits (see `send`).
const WRITER_QUEUE: usize = 4096;

/// The schema's versions, in order; a version, once released, never changes (sqlx checks its
/// checksum).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "governance",
        include_str!("../migrations/0001_governance.sql"),
    ),
    (
        2,
        "rate limits",
        include_str!("../migrations/0002_rate_limits.sql"),
    ),
    (
        3,
        "audit checkpoints",
        include_str!("../migrations/0003_checkpoints.sql"),
    ),
    (
        4,
        "safety policies",
        include_str!("../migrations/0004_policies.sql"),
    ),
    (
        5,
        "config versions",
        include_str!("../migrations/0005_config_versions.sql"),
    ),
    (
        6,
        "open requests index",
        include_str!("../migrations/0006_open_requests_index.sql"),
    ),
    (
        7,
        "holds in requests",
        include_str!("../migrations/0007_holds_in_requests.sql"),
    ),
];

fn migrator() -> Migrator {
    crate::storage::migrator(MIGRATIONS)
}

pub struct SqliteStore {
    pool: SqlitePool,
    writer: flume::Sender<Op>,
    /// Longest wait for room in the writer's queue (`busy_timeout`, as for a lock).
    queue_wait: Duration,
}

impl SqliteStore {
    /// Opens (creating if needed) `config.db_path`, applies migrations and starts the writer.
    /// Must be called inside a tokio runtime.
    pub async fn open(config: &GovConfig) -> Result<SqliteStore, GovError> {
        if let Some(dir) = config
            .db_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                GovError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(&config.db_path)
            .create_if_missing(true)
            .page_size(PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.busy_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(config.busy_timeout.max(Duration::from_secs(1)))
            .connect_with(opts)
            .await?;
        migrator().run(&pool).await?;
        restrict_permissions(&config.db_path);
        let conn = writer_connection(config)?;
        let checkpointer = connection(config)?;
        // The WAL holds the same data as the database until a checkpoint.
        for suffix in ["-wal", "-shm"] {
            restrict_permissions(&writer::beside(&config.db_path, suffix));
        }
        let wal = writer::beside(&config.db_path, "-wal");
        let (tx, rx) = flume::bounded(WRITER_QUEUE);
        std::thread::Builder::new()
            .name("serrano-gov-writer".into())
            .spawn(move || writer::run(conn, checkpointer, wal, rx))
            .map_err(|e| GovError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(SqliteStore {
            pool,
            writer: tx,
            queue_wait: config.busy_timeout,
        })
    }

    /// Queues `op` for the writer. When the queue is full the writer is seconds behind: a new
    /// request's reservation waits at most `queue_wait` for room and is then refused (the
    /// request fails closed and nothing is generated), so that requests waiting to be admitted
    /// are bounded by time, as PostgreSQL's pool bounds them. Every other write (a request's
    /// audit record with its settlement, a barrier) waits as long as it takes: no request may
    /// lose its record, the one refused here included.
    async fn send(&self, op: Op) -> Result<(), GovError> {
        if !matches!(op, Op::Reserve(..)) {
            return self.writer.send_async(op).await.map_err(|_| gone());
        }
        // Arm a timer only when there is no room: a queue with room takes the op at once.
        let op = match self.writer.try_send(op) {
            Ok(()) => return Ok(()),
            Err(flume::TrySendError::Disconnected(_)) => return Err(gone()),
            Err(flume::TrySendError::Full(op)) => op,
        };
        match tokio::time::timeout(self.queue_wait, self.writer.send_async(op)).await {
            Ok(sent) => sent.map_err(|_| gone()),
            Err(_) => Err(GovError::Unavailable(format!(
                "its write queue has been full ({} writes) for {:?}; retry later",
                self.writer.len(),
                self.queue_wait
            ))),
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_tenant(
        &self,
        name: &str,
        retention: Retention,
        now_ms: i64,
    ) -> Result<bool, GovError> {
        let done = sqlx::query(
            "INSERT INTO tenants (name, retention, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(retention.as_str())
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn tenant(&self, name: &str) -> Result<Option<TenantInfo>, GovError> {
        sqlx::query("SELECT id, name, retention, created_ms, policy FROM tenants WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| tenant_row(&r))
            .transpose()
    }

    async fn tenants(&self) -> Result<Vec<TenantInfo>, GovError> {
        sqlx::query("SELECT id, name, retention, created_ms, policy FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(tenant_row)
            .collect()
    }

    async fn set_policy(&self, tenant: &str, policy: Option<&str>) -> Result<bool, GovError> {
        let n = sqlx::query("UPDATE tenants SET policy = ?2 WHERE name = ?1")
            .bind(tenant)
            .bind(policy)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn set_retention(&self, tenant: &str, retention: Retention) -> Result<bool, GovError> {
        let n = sqlx::query("UPDATE tenants SET retention = ?2 WHERE name = ?1")
            .bind(tenant)
            .bind(retention.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<StoredKey>, GovError> {
        let rows = sqlx::query(
            "SELECT k.id AS key_id, k.hash, k.prefix, k.role, k.models, k.expires_ms, k.revoked_ms,
                    t.id, t.name, t.retention, t.created_ms, t.policy
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = ?1",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredKey {
                    id: r.try_get("key_id")?,
                    hash: r.try_get("hash")?,
                    prefix: r.try_get("prefix")?,
                    role: Role::parse(r.try_get("role")?).unwrap_or(Role::Inference),
                    models: crate::storage::parse_models(r.try_get("models")?),
                    expires_ms: r.try_get("expires_ms")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                    tenant: tenant_row(r)?,
                })
            })
            .collect()
    }

    async fn key_hash_exists(&self, hash: &[u8]) -> Result<bool, GovError> {
        let known: Option<i64> = sqlx::query_scalar("SELECT id FROM api_keys WHERE hash = ?1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(known.is_some())
    }

    async fn active_admin_keys(&self) -> Result<i64, GovError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE role = 'admin' AND revoked_ms IS NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn insert_key(&self, k: &KeyRow) -> Result<i64, GovError> {
        let models = k
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        Ok(sqlx::query_scalar(
            "INSERT INTO api_keys (tenant_id, name, prefix, hash, role, models, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        )
        .bind(k.tenant_id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(&k.hash)
        .bind(k.role.as_str())
        .bind(models)
        .bind(k.created_ms)
        .bind(k.expires_ms)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT k.id, t.name AS tenant, k.name, k.prefix, k.role, k.models, k.created_ms,
                    k.expires_ms, k.revoked_ms
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY k.id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    name: r.try_get("name")?,
                    prefix: r.try_get("prefix")?,
                    role: Role::parse(r.try_get("role")?).unwrap_or(Role::Inference),
                    models: crate::storage::parse_models(r.try_get("models")?),
                    created_ms: r.try_get("created_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                })
            })
            .collect()
    }

    async fn revoke_key(&self, id: i64, now_ms: i64) -> Result<bool, GovError> {
        let n =
            sqlx::query("UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL")
                .bind(id)
                .bind(now_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(n == 1)
    }

    async fn key_tenant(&self, id: i64) -> Result<Option<i64>, GovError> {
        Ok(
            sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE id = ?1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_budget(
        &self,
        tenant_id: i64,
        key_id: i64,
        unit: BudgetUnit,
        period: BudgetPeriod,
        limit: i64,
    ) -> Result<i64, GovError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO budgets (tenant_id, key_id, unit, period, limit_amount) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant_id, key_id, unit, period) DO UPDATE SET limit_amount = excluded.limit_amount
             RETURNING id",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(unit.as_str())
        .bind(period.as_str())
        .bind(limit)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn budgets(
        &self,
        tenant: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<BudgetInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT b.id, t.name AS tenant, b.key_id, b.unit, b.period, b.limit_amount
             FROM budgets b JOIN tenants t ON t.id = b.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY b.id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get("id")?;
            let period = BudgetPeriod::parse(r.try_get("period")?).unwrap_or(BudgetPeriod::Total);
            let usage = sqlx::query(
                "SELECT spent, reserved FROM budget_usage WHERE budget_id = ?1 AND period_key = ?2",
            )
            .bind(id)
            .bind(period.key(now_ms))
            .fetch_optional(&self.pool)
            .await?;
            let (spent, reserved) = match usage {
                Some(u) => (u.try_get(0)?, u.try_get(1)?),
                None => (0, 0),
            };
            out.push(BudgetInfo {
                id,
                tenant: r.try_get("tenant")?,
                key_id: r.try_get("key_id")?,
                unit: BudgetUnit::parse(r.try_get("unit")?).unwrap_or(BudgetUnit::Tokens),
                period,
                limit: r.try_get("limit_amount")?,
                spent,
                reserved,
            });
        }
        Ok(out)
    }

    async fn set_limits(&self, tenant_id: i64, key_id: i64, l: Limits) -> Result<i64, GovError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO limits (tenant_id, key_id, rpm, tpm, max_concurrent) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant_id, key_id) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm,
                 max_concurrent = excluded.max_concurrent
             RETURNING id",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(l.rpm)
        .bind(l.tpm)
        .bind(l.max_concurrent)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn limits(&self, tenant: Option<&str>) -> Result<Vec<LimitInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT l.id, t.name AS tenant, l.key_id, l.rpm, l.tpm, l.max_concurrent
             FROM limits l JOIN tenants t ON t.id = l.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY l.id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LimitInfo {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    key_id: r.try_get("key_id")?,
                    limits: Limits {
                        rpm: r.try_get("rpm")?,
                        tpm: r.try_get("tpm")?,
                        max_concurrent: r.try_get("max_concurrent")?,
                    },
                })
            })
            .collect()
    }

    async fn set_price(
        &self,
        model: &str,
        backend: &str,
        input_nusd: i64,
        output_nusd: i64,
    ) -> Result<(), GovError> {
        sqlx::query(
            "INSERT INTO prices (model, backend, input_nusd, output_nusd) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (model, backend) DO UPDATE SET input_nusd = excluded.input_nusd, output_nusd = excluded.output_nusd",
        )
        .bind(model)
        .bind(backend)
        .bind(input_nusd)
        .bind(output_nusd)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reserve(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Reserve(op, tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    async fn finish(&self, op: FinishOp) -> Result<Finished, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Finish(Box::new(op), tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn usage(&self, group_by: &[UsageKey]) -> Result<Vec<UsageRow>, GovError> {
        let sql = crate::storage::usage_sql(group_by);
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    tenant: r.try_get("tenant")?,
                    key: r.try_get("key_prefix")?,
                    model: r.try_get("model")?,
                    day: r.try_get("day")?,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("p")?,
                    completion_tokens: r.try_get("c")?,
                    cost_usd: r.try_get::<i64, _>("cost")? as f64 / crate::NUSD_PER_USD,
                })
            })
            .collect()
    }

    async fn ledger_state(&self) -> Result<LedgerState, GovError> {
        let open: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM requests WHERE state = 'reserved'")
                .fetch_one(&self.pool)
                .await?;
        let r = sqlx::query(crate::storage::LEDGER_TOTALS_SQL)
            .fetch_one(&self.pool)
            .await?;
        Ok(LedgerState {
            open_requests: open,
            reserved_total: r.try_get(0)?,
            spent_total: r.try_get(1)?,
        })
    }

    async fn audit_chain(&self) -> Result<(Vec<ChainRow>, Option<AuditHead>), GovError> {
        // One read transaction, so the head matches the rows even while the writer appends.
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT seq, record, prev_hash, hash FROM audit_log ORDER BY seq")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                Ok(ChainRow {
                    seq: r.try_get(0)?,
                    record: r.try_get(1)?,
                    prev_hash: r.try_get(2)?,
                    hash: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()?;
        tx.commit().await?;
        Ok((rows, head))
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, GovError> {
        Ok(sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()?)
    }

    async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<bool, GovError> {
        let n = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, public_key, signature)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )
        .bind(cp.seq)
        .bind(&cp.hash)
        .bind(cp.time_ms)
        .bind(&cp.public_key)
        .bind(&cp.signature)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, GovError> {
        let rows = sqlx::query(
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    seq: r.try_get(0)?,
                    hash: r.try_get(1)?,
                    time_ms: r.try_get(2)?,
                    public_key: r.try_get(3)?,
                    signature: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<String>, GovError> {
        Ok(
            sqlx::query_scalar("SELECT record FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn erase_content(&self, tenant_id: i64) -> Result<u64, GovError> {
        Ok(
            sqlx::query("DELETE FROM audit_content WHERE tenant_id = ?1")
                .bind(tenant_id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn audit_content(
        &self,
        seq: i64,
    ) -> Result<Option<(String, Option<String>, Option<String>)>, GovError> {
        sqlx::query("SELECT retention, prompt, completion FROM audit_content WHERE seq = ?1")
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .transpose()
    }

    async fn record_config(
        &self,
        hash: &str,
        source: &str,
        author: &str,
        action: &str,
        now_ms: i64,
    ) -> Result<u64, GovError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO config_versions (hash, created_ms, author, source) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash)
        .bind(now_ms)
        .bind(author)
        .bind(source)
        .execute(&mut *tx)
        .await?;
        let version: i64 =
            sqlx::query_scalar("SELECT version FROM config_versions WHERE hash = ?1")
                .bind(hash)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO config_events (version, time_ms, author, action) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(version)
        .bind(now_ms)
        .bind(author)
        .bind(action)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version as u64)
    }

    async fn config_versions(&self) -> Result<Vec<ConfigVersion>, GovError> {
        sqlx::query(
            "SELECT version, hash, created_ms, author FROM config_versions ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| version_row(r, false))
        .collect()
    }

    async fn config_events(&self) -> Result<Vec<ConfigEvent>, GovError> {
        sqlx::query("SELECT version, time_ms, author, action FROM config_events ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ConfigEvent {
                    version: r.try_get::<i64, _>(0)? as u64,
                    time_ms: r.try_get(1)?,
                    author: r.try_get(2)?,
                    action: r.try_get(3)?,
                })
            })
            .collect()
    }

    async fn config_version(&self, version: u64) -> Result<Option<ConfigVersion>, GovError> {
        sqlx::query(
            "SELECT version, hash, created_ms, author, source FROM config_versions WHERE version = ?1",
        )
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await?
        .map(|r| version_row(&r, true))
        .transpose()
    }
}

/// A connection with the pool's settings.
fn connection(config: &GovConfig) -> Result<rusqlite::Connection, GovError> {
    let conn = rusqlite::Connection::open(&config.db_path)?;
    conn.busy_timeout(config.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The writer's connection: it commits without fsync (the writer makes each audit record
/// durable itself, see `writer.rs`) and checkpoints rarely, after a checkpointer thread has
/// copied most pages. Some checkpoint by the writer is needed: without, the WAL grew by ~65 KB a
/// request under steady load (676 MB after 10,000 requests in the benchmark).
fn writer_connection(config: &GovConfig) -> Result<rusqlite::Connection, GovError> {
    let conn = connection(config)?;
    // The ledger and audit use ~30 distinct statements; rusqlite's default cache holds 16, and
    // a thrashing cache re-parses every statement (a sixth of the writer's CPU in a profile).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        WAL_BACKSTOP_BYTES / page.max(512),
    )?;
    Ok(conn)
}

fn gone() -> GovError {
    GovError::Unavailable("the store writer has stopped".into())
}

fn tenant_row(r: &SqliteRow) -> Result<TenantInfo, GovError> {
    Ok(TenantInfo {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        retention: Retention::parse(r.try_get("retention")?).unwrap_or_default(),
        created_ms: r.try_get("created_ms")?,
        policy: r.try_get("policy")?,
    })
}

fn version_row(r: &SqliteRow, with_source: bool) -> Result<ConfigVersion, GovError> {
    Ok(ConfigVersion {
        version: r.try_get::<i64, _>("version")? as u64,
        hash: r.try_get("hash")?,
        created_ms: r.try_get("created_ms")?,
        author: r.try_get("author")?,
        source: if with_source {
            Some(r.try_get("source")?)
        } else {
            None
        },
    })
}

/// The database holds key hashes and audit content: readable by its owner only.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("cannot restrict {}: {e}", path.display());
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A store written before migration 0007 keeps its open reservations: they move into
    /// their request rows, and still expire and release what they held.
    #[tokio::test]
    async fn migration_0007_moves_open_reservations_into_their_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        {
            let opts = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal);
            let pool = SqlitePoolOptions::new().connect_with(opts).await.unwrap();
            let mut before = migrator();
            before.migrations = Cow::Owned(
                before
                    .migrations
                    .iter()
                    .filter(|m| m.version <= 6)
                    .cloned()
                    .collect(),
            );
            before.run(&pool).await.unwrap();
            for sql in [
                "INSERT INTO tenants (id, name, created_ms) VALUES (1, 't', 0)",
                "INSERT INTO budgets (id, tenant_id, unit, period, limit_amount)
                 VALUES (1, 1, 'tokens', 'total', 1000), (2, 1, 'tokens', 'day', 1000)",
                "INSERT INTO budget_usage (budget_id, period_key, spent, reserved)
                 VALUES (1, 'total', 5, 30), (2, '2026-12-03', 0, 30)",
                "INSERT INTO requests (request_id, tenant_id, key_id, state, created_ms,
                                       expires_ms, rate_tokens)
                 VALUES ('open', 1, 0, 'reserved', 0, 1, 30), ('done', 1, 0, 'settled', 0, 1, 5)",
                "INSERT INTO reservations (request_id, budget_id, period_key, amount)
                 VALUES ('open', 1, 'total', 30), ('open', 2, '2026-12-03', 30)",
                "INSERT INTO usage VALUES ('done', 0, '1970-01-01', 't', 'k', 'm', 'b', 2, 3, 0)",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let store = SqliteStore::open(&GovConfig::new(path)).await.unwrap();
        let holds: Option<String> =
            sqlx::query_scalar("SELECT holds FROM requests WHERE request_id = 'open'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        let mut holds: Vec<(i64, String, i64)> = serde_json::from_str(&holds.unwrap()).unwrap();
        holds.sort();
        assert_eq!(
            holds,
            [
                (1, "total".to_string(), 30),
                (2, "2026-12-03".to_string(), 30)
            ]
        );
        let kept: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM usage WHERE request_id = 'done' AND completion_tokens = 3",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(kept, 1);
        // Long expired: the writer's first sweep releases it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let state = loop {
            let state = store.ledger_state().await.unwrap();
            if state.open_requests == 0 || std::time::Instant::now() > deadline {
                break state;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            state,
            LedgerState {
                open_requests: 0,
                reserved_total: 0,
                spent_total: 5
            }
        );
    }

    /// A writer that falls behind refuses new requests after `busy_timeout` rather than
    /// queueing them without bound, yet never refuses an audit record.
    #[tokio::test]
    async fn a_full_writer_queue_refuses_new_requests_but_not_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(dir.path().join("g.db"))
            .create_if_missing(true);
        // A writer that never takes an op: its queue holds one.
        let (tx, rx) = flume::bounded(1);
        let store = std::sync::Arc::new(SqliteStore {
            pool: SqlitePoolOptions::new().connect_lazy_with(opts),
            writer: tx,
            queue_wait: Duration::from_millis(200),
        });
        let finish = |i: usize, settles: bool| FinishOp {
            settlement: settles.then(|| crate::storage::Settlement {
                request_id: format!("r{i}"),
                tenant_id: 1,
                key_id: 1,
                tenant: "t".into(),
                key_prefix: "k".into(),
                model: "m".into(),
                backend: "b".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
            }),
            record: crate::AuditRecord {
                request_id: format!("r{i}"),
                ..Default::default()
            },
            content: None,
        };
        let first = tokio::spawn({
            let store = store.clone();
            async move { store.finish(finish(0, false)).await }
        });
        while rx.is_empty() {
            tokio::task::yield_now().await;
        }
        let reserve = ReserveOp {
            request_id: "r1".into(),
            tenant_id: 1,
            key_id: 1,
            model: "m".into(),
            backend: "b".into(),
            fallbacks: vec![],
            prompt_tokens: 1,
            max_completion_tokens: 1,
            expires_ms: i64::MAX,
        };
        let started = std::time::Instant::now();
        let refused = store.reserve(reserve).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            matches!(&refused, GovError::Unavailable(m) if m.contains("queue has been full")),
            "{refused:?}"
        );
        // Audit records, with or without a settlement, wait for room however long it takes.
        let waiting: Vec<_> = [(2, false), (3, true)]
            .into_iter()
            .map(|(i, settles)| {
                let store = store.clone();
                tokio::spawn(async move { store.finish(finish(i, settles)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "an audit record gave up waiting"
        );
        // As the writer takes ops, each record gets its place in the queue.
        let mut queued = Vec::new();
        for _ in 0..3 {
            let Ok(Op::Finish(op, reply)) = rx.recv_async().await else {
                panic!("a record was not queued")
            };
            queued.push(op.record.request_id);
            drop(reply);
        }
        queued.sort();
        assert_eq!(queued, ["r0", "r2", "r3"]);
        assert!(first.await.unwrap().is_err());
        for w in waiting {
            assert!(w.await.unwrap().is_err());
        }
    }

    #[tokio::test]
    async fn conforms_to_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&GovConfig::new(dir.path().join("g.db")))
            .await
            .unwrap();
        crate::storage::conformance::check(&store).await;
    }

    /// The writer commits without checkpointing inline; the WAL must still start over rather
    /// than grow by every page ever written (~16 pages per audited request), and new
    /// databases get the small pages.
    #[tokio::test]
    async fn the_wal_stays_bounded_under_steady_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let store = SqliteStore::open(&GovConfig::new(path.clone()))
            .await
            .unwrap();
        // ~22 KB of WAL each (6 KB of content and the pages around it): four times the
        // backstop, twice the bound below, were the WAL never to start over.
        let requests = 3072;
        for i in 0..requests {
            let record = crate::AuditRecord {
                request_id: format!("r{i}"),
                status: 200,
                ..Default::default()
            };
            let content = crate::Content {
                tenant_id: 1,
                retention: Retention::Full,
                prompt: "p".repeat(3000),
                completion: "c".repeat(3000),
            };
            let op = FinishOp {
                settlement: None,
                record,
                content: Some(content),
            };
            store.finish(op).await.unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("g.db-wal"))
            .unwrap()
            .len();
        let bound = 2 * WAL_BACKSTOP_BYTES as u64;
        assert!(wal < bound, "WAL of {wal} bytes after {requests} requests");
        assert_eq!(store.audit_chain().await.unwrap().0.len(), requests);
        let conn = rusqlite::Connection::open(&path).unwrap();
        let page: u32 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        assert_eq!(page, PAGE_SIZE);
    }
}
