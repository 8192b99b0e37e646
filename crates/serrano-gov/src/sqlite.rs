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
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::Transaction;
use tokio::sync::oneshot;

use crate::config::GovConfig;
use crate::error::GovError;
use crate::rate::RateInfo;
use crate::sql_store::{NewConfig, SqlStore};
use crate::storage::{FinishOp, Finished, ReserveOp};
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
    (
        8,
        "tool call limits",
        include_str!("../migrations/0008_tool_call_limits.sql"),
    ),
    (
        9,
        "key interactive grant",
        include_str!("../migrations/0009_key_interactive_grant.sql"),
    ),
    (
        10,
        "admin changes",
        include_str!("../migrations/0010_admin_changes.sql"),
    ),
];

fn migrator() -> Migrator {
    crate::sql::migrator(MIGRATIONS)
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
impl SqlStore for SqliteStore {
    type Db = Sqlite;
    const KIND: &'static str = "sqlite";
    const SNAPSHOT: Option<&'static str> = None;

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn write_queue(&self) -> Option<(usize, usize)> {
        Some((self.writer.len(), WRITER_QUEUE))
    }

    async fn reserve_request(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Reserve(op, tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    async fn finish_request(&self, op: FinishOp) -> Result<Finished, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Finish(Box::new(op), tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    async fn flush_writes(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Versions are the table's rowids: a new text gets the next one.
    async fn config_version_of(
        tx: &mut Transaction<'static, Sqlite>,
        config: NewConfig<'_>,
    ) -> Result<i64, GovError> {
        sqlx::query(
            "INSERT INTO config_versions (hash, created_ms, author, source) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(config.hash)
        .bind(config.now_ms)
        .bind(config.author)
        .bind(config.source)
        .execute(&mut **tx)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT version FROM config_versions WHERE hash = ?1")
                .bind(config.hash)
                .fetch_one(&mut **tx)
                .await?,
        )
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
    use crate::audit::Retention;
    use crate::storage::Store;
    use crate::types::LedgerState;

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
            tool_call: false,
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
