//! The PostgreSQL [`Store`]: for gateway replicas on several machines sharing one database, so
//! that budgets and rate limits are not multiplied by the number of replicas and the audit log
//! stays one chain.
//!
//! Every ledger and audit operation is one transaction of its own, and is durable before its
//! call returns. The two on every request's path (reserve and finish) hold a lock that the
//! whole fleet queues on (a tenant's, the audit head's), so they commit asynchronously
//! (`synchronous_commit = off` for that transaction only: the lock is released once the commit
//! record is in the WAL buffers) and then wait, lock-free, for a WAL flush that covers it
//! ([`flush_wal`]). Commits of several replicas then share one fsync instead of each paying one
//! inside the lock: with the fsync inside, one tenant's requests and the whole fleet's audit
//! records were capped at one per fsync (BENCHMARKS.md). A crash of the server loses only asynchronously committed transactions at
//! the end of the WAL, whose callers were never answered; recovery replays a prefix, so the
//! audit chain stays whole. How the invariants of `storage.rs` hold across processes:
//! - A reservation takes a transaction-scoped advisory lock on its tenant first, so that the
//!   reservations of one tenant (from every replica) check and write one after another:
//!   concurrent-request counts, rate windows and budget windows are read and then written, and
//!   two reservations must not both read a count before either writes it. Budgets are guarded a
//!   second time by the conditional upsert itself (`sql::HOLD_SQL`, `... WHERE spent + reserved
//!   <= limit - amount`), which PostgreSQL re-checks against the newest row version after a wait.
//! - Settlement and expiry take no tenant lock: they only lower what a reservation checks
//!   (reserved, open requests, counted tokens), so a reservation that read before them was
//!   stricter than it needed to be, never looser.
//! - The audit chain's head is one row (`audit_head`), locked `FOR UPDATE` by each record's
//!   transaction, last, so that records from every replica form one sequence and the lock is
//!   held only for the inserts and the commit.
//! - Rows are locked in one order everywhere (the request, then budget windows by id, then rate
//!   windows by limit id, then the head), so transactions do not deadlock; one that does
//!   anyway (or fails serialization) is retried.
//! - Expired reservations are released by a background task on every replica; `FOR UPDATE
//!   SKIP LOCKED` keeps two replicas from releasing the same one.
//!
//! A reservation waits at most the busy timeout (for a connection, a lock, a statement) and
//! then fails closed. A finish (settlement and audit record) tries again after every transient
//! failure, for as long as it takes, as the SQLite store's does: every request keeps its record.
//! Where a try failed at its commit or at the WAL flush after it, whether the record landed is
//! asked (by its seq and hash, once a flush has made what committed durable) rather than
//! assumed, so a record is written once.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use crate::audit::{chain_hash, sha256_hex, Retention};
use crate::budget::{self, decode_holds, encode_holds, i64_of, Amount, Budget, Hold};
use crate::config::GovConfig;
use crate::error::GovError;
use crate::rate::{self, Limit, RateInfo};
use crate::sql::{numbered, HOLD_SQL};
use crate::sql_store::{NewConfig, SqlStore};
use crate::storage::{FinishOp, Finished, ReserveOp, Settlement};
use crate::time::{day_key, now_ms};
use crate::types::{BudgetPeriod, BudgetUnit};

/// Connections one process keeps; each in-flight reservation or settlement holds one.
const MAX_CONNECTIONS: u32 = 16;
/// How often expired reservations are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Most expired requests released in one sweep (a bounded transaction after a crash under load).
const MAX_EXPIRED_PER_SWEEP: i64 = 10_000;
/// Tries of a transaction that PostgreSQL aborted as a deadlock or a serialization failure.
const MAX_TRIES: usize = 3;
/// The advisory-lock namespace of tenant locks (the first key of the two-key form): "srrn".
const TENANT_LOCK_CLASS: i32 = 0x7372_726e;
/// The first wait of a finish before it tries again after a transient failure; each later
/// wait doubles, up to [`FINISH_RETRY_MAX`] (jittered to half of it at random, so that the
/// finishes a lock held up do not all come back at once).
const FINISH_RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between two tries of a finish: the database is asked about once a second
/// while it cannot take records, on top of each try's own busy timeout.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(1);
/// A finish still trying logs a warning at its first failure and every this many after.
const FINISH_WARN_EVERY: u32 = 30;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "governance",
        include_str!("../migrations-pg/0001_governance.sql"),
    ),
    (
        2,
        "tool call limits",
        include_str!("../migrations-pg/0002_tool_call_limits.sql"),
    ),
    (
        3,
        "key interactive grant",
        include_str!("../migrations-pg/0003_key_interactive_grant.sql"),
    ),
    (
        4,
        "admin changes",
        include_str!("../migrations-pg/0004_admin_changes.sql"),
    ),
];

fn migrator() -> Migrator {
    crate::sql::migrator(MIGRATIONS)
}

/// Whether a database setting names PostgreSQL (`postgres://` or `postgresql://`).
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A database setting as it may be shown in logs and errors: a URL's password replaced by `***`.
pub fn display_db(db: &str) -> String {
    if !is_postgres_url(db) {
        return db.to_string();
    }
    let Some((scheme, rest)) = db.split_once("://") else {
        return db.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => db.to_string(),
        },
        None => db.to_string(),
    }
}

pub struct PgStore {
    pool: PgPool,
    sweeper: tokio::task::JoinHandle<()>,
    /// Finishes in flight, which `flush` waits for (they may be retrying).
    finishing: tokio::sync::watch::Sender<usize>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

/// A transaction's failure: the database's (maybe worth a retry) or a refusal of the request.
enum TxError {
    Db(sqlx::Error),
    Gov(GovError),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<GovError> for TxError {
    fn from(e: GovError) -> Self {
        TxError::Gov(e)
    }
}

impl From<TxError> for GovError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Db(e) => GovError::from(e),
            TxError::Gov(e) => e,
        }
    }
}

/// Deadlock detected, or serialization failure: the transaction was rolled back whole.
fn retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

/// A failure that a later try may not meet: the database was busy (no connection within the
/// busy timeout, a lock or statement timeout), the connection was lost or the server is
/// restarting, or the transaction was rolled back as a deadlock or serialization failure.
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| transient_code(&c)),
        _ => false,
    }
}

/// SQLSTATEs of [`transient`] failures.
fn transient_code(code: &str) -> bool {
    // 08: connection exceptions.
    code.starts_with("08")
        || matches!(
            code,
            // Deadlock, serialization failure.
            "40P01" | "40001"
            // Lock timeout, statement timeout (or a cancel), idle-in-transaction timeout.
            | "55P03" | "57014" | "25P03"
            // The server shutting down, crashed, starting; too many connections.
            | "57P01" | "57P02" | "57P03" | "53300"
        )
}

/// The waits of one finish between its tries (see [`FINISH_RETRY_FIRST`]).
struct Backoff<'a> {
    request_id: &'a str,
    next: Duration,
    tries: u32,
}

impl<'a> Backoff<'a> {
    fn new(request_id: &'a str) -> Self {
        Backoff {
            request_id,
            next: FINISH_RETRY_FIRST,
            tries: 0,
        }
    }

    /// Waits before the next try after `e`.
    async fn wait(&mut self, e: &sqlx::Error) {
        self.tries += 1;
        if self.tries == 1 || self.tries.is_multiple_of(FINISH_WARN_EVERY) {
            tracing::warn!(
                request_id = self.request_id,
                tries = self.tries,
                "an audit record waits for the database: {e}"
            );
        }
        let jittered = self.next.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::time::sleep(jittered).await;
        self.next = (self.next * 2).min(FINISH_RETRY_MAX);
    }
}

/// Where a finish's record sits if its transaction commits, and what it returns then.
struct Written {
    finished: Finished,
    hash: String,
}

/// Counts a finish in flight for as long as it lives (cancelled or not).
struct InFlight<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> InFlight<'a> {
    fn new(count: &'a tokio::sync::watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl PgStore {
    /// Connects to `url`, applies migrations (under sqlx's advisory lock, so replicas starting
    /// together apply them once) and starts the expiry sweeper. Must be called inside a tokio
    /// runtime. `config.busy_timeout` bounds every wait: for a connection, a lock, a statement
    /// (a reservation then fails closed; a finish tries again until its record lands).
    pub async fn connect(url: &str, config: &GovConfig) -> Result<PgStore, GovError> {
        let wait = config.busy_timeout.max(Duration::from_secs(1));
        let ms = wait.as_millis().to_string();
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| GovError::Invalid(format!("not a PostgreSQL URL: {e}")))?
            .application_name("serrano")
            .options([
                ("statement_timeout", ms.as_str()),
                ("lock_timeout", ms.as_str()),
                ("idle_in_transaction_session_timeout", ms.as_str()),
                // Whatever the server's default: every commit but the two that `flush_wal`
                // makes durable waits for its own flush, and so does `flush_wal`'s.
                ("synchronous_commit", "on"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(wait)
            // No ping before each use: it is a round trip, three per request. A connection the
            // server dropped (a restart) fails its next statement instead: that request gets 503
            // (fail closed) and the pool replaces the connection.
            .test_before_acquire(false)
            .connect_with(opts)
            .await?;
        migrator().run(&pool).await?;
        let sweeper = tokio::spawn(sweep_loop(pool.clone()));
        Ok(PgStore {
            pool,
            sweeper,
            finishing: tokio::sync::watch::Sender::new(0),
        })
    }

    async fn reserve_once(&self, op: &ReserveOp) -> Result<Option<RateInfo>, TxError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let (t, k) = (op.tenant_id, op.key_id);
        let worst_tokens = budget::worst_tokens(op);
        let minute = now.div_euclid(60_000);
        let limits = lock_tenant(&mut tx, t, k).await?;
        // First, so that a replayed id is refused as a replay whatever else it would fail.
        let fresh = sqlx::query(
            "INSERT INTO requests (request_id, tenant_id, key_id, state, created_ms, expires_ms,
                                   rate_minute, rate_tokens)
             VALUES ($1, $2, $3, 'reserved', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&op.request_id)
        .bind(t)
        .bind(k)
        .bind(now)
        .bind(op.expires_ms)
        .bind((!limits.is_empty()).then_some(minute))
        .bind(worst_tokens)
        .execute(&mut *tx)
        .await?;
        if fresh.rows_affected() == 0 {
            return Err(GovError::Duplicate(op.request_id.clone()).into());
        }
        // Refusals return early: dropping the transaction rolls back what it wrote.
        let rate = check_limits(&mut tx, op, &limits, worst_tokens, minute, now).await?;
        let holds = hold_budgets(&mut tx, op, now).await?;
        if !limits.is_empty() || !holds.is_empty() {
            // One statement: the holds into the request's row (locked since its insert), then
            // the rate windows in limit id order.
            let ids: Vec<i64> = limits.iter().map(|l| l.id).collect();
            let holds = (!holds.is_empty())
                .then(|| encode_holds(&holds))
                .transpose()?;
            sqlx::query(
                "WITH h AS (UPDATE requests SET holds = $4 WHERE request_id = $5 AND $4 IS NOT NULL)
                 INSERT INTO rate_windows (limit_id, minute, requests, tokens, tool_calls)
                 SELECT id, $2, 1, $3, $6 FROM unnest($1::bigint[]) WITH ORDINALITY AS l (id, n)
                 ORDER BY n
                 ON CONFLICT (limit_id, minute) DO UPDATE
                 SET requests = rate_windows.requests + 1,
                     tokens = rate_windows.tokens + excluded.tokens,
                     tool_calls = rate_windows.tool_calls + excluded.tool_calls",
            )
            .bind(&ids)
            .bind(minute)
            .bind(worst_tokens)
            .bind(holds)
            .bind(&op.request_id)
            .bind(i64::from(op.tool_call))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(rate)
    }

    /// Settles and appends the record until it is durable, trying again after every transient
    /// failure (see the module's comment).
    async fn finish_durably(&self, op: &FinishOp) -> Result<Finished, GovError> {
        let mut backoff = Backoff::new(&op.record.request_id);
        loop {
            let (tx, written) = match self.finish_uncommitted(op).await {
                Ok(t) => t,
                Err(TxError::Db(e)) if transient(&e) => {
                    backoff.wait(&e).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let outcome = match tx.commit().await {
                Ok(()) => flush_wal(&self.pool).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => return Ok(written.finished),
                Err(e) if transient(&e) => {
                    backoff.wait(&e).await;
                    if self.landed(&written, &mut backoff).await? {
                        return Ok(written.finished);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether a record whose commit or flush failed is in the chain, durably: flushes the WAL
    /// (so what committed before is on disk), then looks for the record's seq and hash.
    async fn landed(&self, w: &Written, backoff: &mut Backoff<'_>) -> Result<bool, GovError> {
        loop {
            let found = async {
                flush_wal(&self.pool).await?;
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM audit_log WHERE seq = $1 AND hash = $2)",
                )
                .bind(w.finished.seq as i64)
                .bind(&w.hash)
                .fetch_one(&self.pool)
                .await
            };
            match found.await {
                Ok(found) => return Ok(found),
                Err(e) if transient(&e) => backoff.wait(&e).await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The finish's transaction, ready to commit.
    async fn finish_uncommitted(&self, op: &FinishOp) -> Result<(Tx, Written), TxError> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let cost = match &op.settlement {
            Some(s) => settle(&mut tx, s, now).await?,
            None => 0,
        };
        let head = sqlx::query(
            "SELECT seq, hash, set_config('synchronous_commit', 'off', true) FROM audit_head
             WHERE id = 1 FOR UPDATE",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(head) = head else {
            return Err(
                GovError::Unavailable("the audit chain's head row is missing".into()).into(),
            );
        };
        let (prev_seq, prev_hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
        let seq = prev_seq + 1;
        let mut record = op.record.clone();
        record.seq = seq as u64;
        record.time_ms = now;
        record.cost_nusd = cost;
        let text = serde_json::to_string(&record)
            .map_err(|e| GovError::Unavailable(format!("cannot encode an audit record: {e}")))?;
        let hash = chain_hash(&prev_hash, seq as u64, &text);
        let content = op
            .content
            .as_ref()
            .filter(|c| c.retention != Retention::None)
            .map(|c| match c.retention {
                Retention::Hash => (c, sha256_hex(&c.prompt), sha256_hex(&c.completion)),
                _ => (c, c.prompt.clone(), c.completion.clone()),
            });
        // The record, its content (if kept) and the new head, in one round trip: the head's
        // lock is held until the commit, and every round trip under it is the fleet's.
        sqlx::query(
            "WITH record AS (INSERT INTO audit_log (seq, record, prev_hash, hash)
                             VALUES ($1, $2, $3, $4)),
                  content AS (INSERT INTO audit_content (seq, tenant_id, retention, prompt,
                                                         completion)
                              SELECT $1, $5, $6, $7, $8 WHERE $6::text IS NOT NULL)
             UPDATE audit_head SET seq = $1, hash = $4 WHERE id = 1",
        )
        .bind(seq)
        .bind(&text)
        .bind(&prev_hash)
        .bind(&hash)
        .bind(content.as_ref().map(|(c, ..)| c.tenant_id))
        .bind(content.as_ref().map(|(c, ..)| c.retention.as_str()))
        .bind(content.as_ref().map(|(_, p, _)| p.as_str()))
        .bind(content.as_ref().map(|(.., c)| c.as_str()))
        .execute(&mut *tx)
        .await?;
        let finished = Finished {
            seq: seq as u64,
            cost_nusd: cost,
        };
        Ok((tx, Written { finished, hash }))
    }
}

/// Returns once the WAL is on disk up to this call, so once every transaction that committed
/// before it is durable, however it committed. A transactional logical message is the smallest
/// write with a transaction id (any user may emit one, at any `wal_level`), and committing one
/// with `synchronous_commit` on flushes the WAL up to its own commit record. It takes no lock,
/// so concurrent callers' flushes merge into one fsync (PostgreSQL's group commit).
async fn flush_wal(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_logical_emit_message(true, 'serrano', '')")
        .execute(pool)
        .await?;
    Ok(())
}

/// Runs a transaction until it commits, is refused, or fails for a reason a retry cannot fix.
macro_rules! with_retries {
    ($what:expr) => {{
        let mut tries = 0;
        loop {
            tries += 1;
            match $what.await {
                Ok(v) => break Ok(v),
                Err(TxError::Db(e)) if retryable(&e) && tries < MAX_TRIES => continue,
                Err(TxError::Db(e)) => break Err(GovError::from(e)),
                Err(TxError::Gov(e)) => break Err(e),
            }
        }
    }};
}

type Tx = Transaction<'static, Postgres>;

/// Takes the tenant's lock (see the module's comment) and reads the request's rate limits, in
/// one round trip, and turns this transaction's commit asynchronous (the caller flushes).
/// Reading the limits with the statement's snapshot, from before the lock was granted, is
/// fine: they are configuration. The counts they are checked against are read by later
/// statements, under the lock.
async fn lock_tenant(tx: &mut Tx, tenant_id: i64, key_id: i64) -> Result<Vec<Limit>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT pg_advisory_xact_lock($3, $4), set_config('synchronous_commit', 'off', true),
                l.id, l.key_id, l.rpm, l.tpm, l.max_concurrent,
                l.tool_calls_per_minute, l.tool_calls_per_day
         FROM (SELECT 1) AS one
         LEFT JOIN limits l ON l.tenant_id = $1 AND (l.key_id = 0 OR l.key_id = $2)
         ORDER BY l.id",
    )
    .bind(tenant_id)
    .bind(key_id)
    .bind(TENANT_LOCK_CLASS)
    .bind(tenant_id.rem_euclid(i64::from(i32::MAX)) as i32)
    .fetch_all(&mut **tx)
    .await?;
    let mut limits = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(id) = r.try_get::<Option<i64>, _>(2)? else {
            continue;
        };
        limits.push(Limit {
            id,
            key_id: r.try_get(3)?,
            rpm: r.try_get(4)?,
            tpm: r.try_get(5)?,
            max_concurrent: r.try_get(6)?,
            tool_calls_per_minute: r.try_get(7)?,
            tool_calls_per_day: r.try_get(8)?,
        });
    }
    Ok(limits)
}

/// A budget window's (spent, reserved), by (budget id, window).
type Usage = HashMap<(i64, String), (i64, i64)>;

/// The budgets of a tenant and key, by id, with the spend and reservations of their windows
/// that `now` falls in (read together: one round trip under the tenant lock). Which window of a
/// budget counts is the budget rule's to say: this reads each budget's rows among the day's,
/// the month's and the total window, where it has at most one.
async fn budgets(
    tx: &mut Tx,
    tenant_id: i64,
    key_id: i64,
    now: i64,
) -> Result<(Vec<Budget>, Usage), sqlx::Error> {
    let windows = [BudgetPeriod::Day, BudgetPeriod::Month, BudgetPeriod::Total].map(|p| p.key(now));
    let rows = sqlx::query(
        "SELECT b.id, b.key_id, b.unit, b.period, b.limit_amount, u.period_key, u.spent, u.reserved
         FROM budgets b
         LEFT JOIN budget_usage u ON u.budget_id = b.id AND u.period_key = ANY($3)
         WHERE b.tenant_id = $1 AND (b.key_id = 0 OR b.key_id = $2) ORDER BY b.id",
    )
    .bind(tenant_id)
    .bind(key_id)
    .bind(&windows[..])
    .fetch_all(&mut **tx)
    .await?;
    let (mut budgets, mut usage) = (Vec::<Budget>::new(), Usage::new());
    for r in rows {
        let id: i64 = r.try_get(0)?;
        if budgets.last().is_none_or(|b| b.id != id) {
            let (unit, period) = (r.try_get(2)?, r.try_get(3)?);
            budgets.push(Budget::from_columns(
                id,
                r.try_get(1)?,
                unit,
                period,
                r.try_get(4)?,
            ));
        }
        if let Some(window) = r.try_get::<Option<String>, _>(5)? {
            usage.insert((id, window), (r.try_get(6)?, r.try_get(7)?));
        }
    }
    Ok((budgets, usage))
}

/// Every rate limit of the request, read only (the tenant lock is held).
async fn check_limits(
    tx: &mut Tx,
    op: &ReserveOp,
    limits: &[Limit],
    worst_tokens: i64,
    minute: i64,
    now: i64,
) -> Result<Option<RateInfo>, TxError> {
    let mut rate = None;
    for l in limits {
        // The open-request count (only where a concurrency limit needs it), this minute's and
        // the last minute's windows, and (for a tool call under a tool-call limit) the day's
        // tool calls, in one round trip.
        let w = sqlx::query(
            "SELECT CASE WHEN $4 THEN
                        (SELECT COUNT(*) FROM requests WHERE state = 'reserved'
                         AND tenant_id = $1 AND ($2 = 0 OR key_id = $2))
                    ELSE 0 END,
                    p.requests, p.tokens, c.requests, c.tokens, p.tool_calls, c.tool_calls,
                    CASE WHEN $6 THEN
                        (SELECT SUM(tool_calls)::BIGINT FROM rate_windows WHERE limit_id = $3
                         AND minute BETWEEN $5 - MOD($5, 1440) AND $5)
                    ELSE 0 END
             FROM (SELECT 1) AS one
             LEFT JOIN rate_windows p ON p.limit_id = $3 AND p.minute = $5 - 1
             LEFT JOIN rate_windows c ON c.limit_id = $3 AND c.minute = $5",
        )
        .bind(op.tenant_id)
        .bind(l.key_id)
        .bind(l.id)
        .bind(l.max_concurrent.is_some())
        .bind(minute)
        .bind(op.tool_call && l.limits_tool_calls())
        .fetch_one(&mut **tx)
        .await?;
        let counts = |i: usize| -> Result<(i64, i64), sqlx::Error> {
            Ok((
                w.try_get::<Option<i64>, _>(i)?.unwrap_or(0),
                w.try_get::<Option<i64>, _>(i + 1)?.unwrap_or(0),
            ))
        };
        let count: i64 = w.try_get(0)?;
        // The request's own row is already in: count the others.
        let open = if l.max_concurrent.is_some() {
            count - 1
        } else {
            0
        };
        let (prev, curr) = (counts(1)?, counts(3)?);
        let calls = match op.tool_call {
            true => Some(rate::Calls {
                prev: w.try_get::<Option<i64>, _>(5)?.unwrap_or(0),
                curr: w.try_get::<Option<i64>, _>(6)?.unwrap_or(0),
                day: w.try_get::<Option<i64>, _>(7)?.unwrap_or(0),
            }),
            false => None,
        };
        let seen = rate::Seen {
            prev,
            curr,
            open,
            tokens: worst_tokens,
            now_ms: now,
            calls,
        };
        rate::check(l, &seen, &mut rate)?;
    }
    Ok(rate)
}

/// Reserves the worst case in every budget window of the request, in budget id order, if the
/// budget rule admits it (checked against the counts read under the tenant lock), or refuses.
async fn hold_budgets(tx: &mut Tx, op: &ReserveOp, now: i64) -> Result<Vec<Hold>, TxError> {
    let (budgets, usage) = budgets(tx, op.tenant_id, op.key_id, now).await?;
    let mut prices = Vec::new();
    if budgets.iter().any(|b| b.unit == BudgetUnit::Usd) {
        let backends: Vec<&str> = std::iter::once(&op.backend)
            .chain(&op.fallbacks)
            .map(String::as_str)
            .collect();
        // A backend without a price row costs nothing, as in SQLite's ledger.
        let rows = sqlx::query(
            "SELECT input_nusd, output_nusd FROM prices WHERE model = $1 AND backend = ANY($2)",
        )
        .bind(&op.model)
        .bind(&backends)
        .fetch_all(&mut **tx)
        .await?;
        for p in rows {
            prices.push((p.try_get(0)?, p.try_get(1)?));
        }
    }
    let holds = budget::hold(&budgets, Amount::worst(op, prices), now, |b, window| {
        let counts = usage.get(&(b.id, window.to_string()));
        Ok::<_, TxError>(counts.copied().unwrap_or((0, 0)))
    })?;
    let hold_sql = numbered(HOLD_SQL, '$');
    for h in &holds {
        // The guard repeats the rule against the row itself: settling a request whose
        // reservation expired charges its window without the tenant lock, so the spend may
        // have grown since the read.
        let fits = sqlx::query(&hold_sql)
            .bind(h.budget.id)
            .bind(&h.window)
            .bind(h.amount)
            .bind(h.budget.limit)
            .execute(&mut **tx)
            .await?
            .rows_affected()
            == 1;
        if !fits {
            return Err(budget::refusal(&h.budget, h.amount).into());
        }
    }
    Ok(holds)
}

/// Replaces the request's reservations by its actual usage and records the usage; returns the
/// cost in nano-dollars. A request that never reserved, or settled already, is charged nothing.
async fn settle(tx: &mut Tx, s: &Settlement, now: i64) -> Result<i64, TxError> {
    // The request's row, locked, and the backend's prices, in one round trip.
    let row = sqlx::query(
        "SELECT state, rate_minute, rate_tokens, holds,
                (SELECT ARRAY[input_nusd, output_nusd] FROM prices
                 WHERE model = $2 AND backend = $3)
         FROM requests WHERE request_id = $1 FOR UPDATE",
    )
    .bind(&s.request_id)
    .bind(&s.model)
    .bind(&s.backend)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(0) };
    let prices = match row.try_get::<Option<Vec<i64>>, _>(4)?.as_deref() {
        Some(&[input, output]) => (input, output),
        _ => (0, 0),
    };
    let used = Amount::used(prices, s.prompt_tokens, s.completion_tokens);
    let state: String = row.try_get(0)?;
    if state == "settled" {
        return Ok(0);
    }
    let (rate_minute, rate_tokens): (Option<i64>, i64) = (row.try_get(1)?, row.try_get(2)?);
    if state == "reserved" {
        for (budget_id, window, amount) in decode_holds(row.try_get(3)?)? {
            // Never charge more than was reserved: the worst case bounds the usage. A budget
            // deleted since took its windows with it, and there is nothing to release.
            sqlx::query(
                "UPDATE budget_usage u SET reserved = u.reserved - $3,
                     spent = u.spent + LEAST($3, CASE b.unit WHEN 'usd' THEN $4 ELSE $5 END)
                 FROM budgets b
                 WHERE b.id = u.budget_id AND u.budget_id = $1 AND u.period_key = $2",
            )
            .bind(budget_id)
            .bind(&window)
            .bind(amount)
            .bind(used.cost)
            .bind(used.tokens)
            .execute(&mut **tx)
            .await?;
        }
    } else {
        // The reservation expired (the request outlived its TTL): the usage happened, so charge
        // it to the current windows.
        for b in budgets(tx, s.tenant_id, s.key_id, now).await?.0 {
            sqlx::query(
                "INSERT INTO budget_usage (budget_id, period_key, spent) VALUES ($1, $2, $3)
                 ON CONFLICT (budget_id, period_key) DO UPDATE
                 SET spent = budget_usage.spent + excluded.spent",
            )
            .bind(b.id)
            .bind(b.period.key(now))
            .bind(used.of(b.unit))
            .execute(&mut **tx)
            .await?;
        }
    }
    let unused = rate_tokens - used.tokens;
    if let Some(minute) = rate_minute.filter(|_| unused > 0) {
        // Gives back the unused worst case to the tenant's and key's current limits, locking
        // their windows in limit id order (as reservations write them).
        sqlx::query(
            "WITH w AS (
                 SELECT limit_id FROM rate_windows
                 WHERE minute = $3 AND limit_id IN
                     (SELECT id FROM limits WHERE tenant_id = $1 AND key_id IN (0, $2))
                 ORDER BY limit_id FOR UPDATE)
             UPDATE rate_windows SET tokens = GREATEST(0, tokens - $4)
             WHERE minute = $3 AND limit_id IN (SELECT limit_id FROM w)",
        )
        .bind(s.tenant_id)
        .bind(s.key_id)
        .bind(minute)
        .bind(unused)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(
        "WITH settled AS (UPDATE requests SET state = 'settled', holds = NULL
                          WHERE request_id = $1)
         INSERT INTO usage (request_id, time_ms, day, tenant, key_prefix, model, backend,
                            prompt_tokens, completion_tokens, cost_nusd)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&s.request_id)
    .bind(now)
    .bind(day_key(now))
    .bind(&s.tenant)
    .bind(&s.key_prefix)
    .bind(&s.model)
    .bind(&s.backend)
    .bind(i64_of(s.prompt_tokens))
    .bind(i64_of(s.completion_tokens))
    .bind(used.cost)
    .execute(&mut **tx)
    .await?;
    Ok(used.cost)
}

async fn sweep_loop(pool: PgPool) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match expire(&pool, now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!("released the reservations of {n} expired requests"),
            Err(e) => tracing::warn!("cannot expire stale reservations: {e}"),
        }
    }
}

/// Releases the reservations of requests past their expiry (their process died or hung).
/// Returns how many requests expired.
async fn expire(pool: &PgPool, now: i64) -> Result<u64, GovError> {
    let mut tx = pool.begin().await?;
    let stale = sqlx::query(
        "SELECT request_id, holds FROM requests WHERE state = 'reserved' AND expires_ms < $1
         LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(MAX_EXPIRED_PER_SWEEP)
    .fetch_all(&mut *tx)
    .await?;
    if stale.is_empty() {
        return Ok(0);
    }
    // Summed per window, and released in (budget, window) order: the order every other
    // transaction locks budget windows in.
    let mut release: BTreeMap<(i64, String), i64> = BTreeMap::new();
    let mut ids = Vec::with_capacity(stale.len());
    for r in &stale {
        ids.push(r.try_get::<String, _>(0)?);
        for (budget_id, window, amount) in decode_holds(r.try_get(1)?)? {
            *release.entry((budget_id, window)).or_default() += amount;
        }
    }
    for ((budget_id, window), amount) in release {
        sqlx::query(
            "UPDATE budget_usage SET reserved = reserved - $3
             WHERE budget_id = $1 AND period_key = $2",
        )
        .bind(budget_id)
        .bind(window)
        .bind(amount)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE requests SET state = 'expired', holds = NULL WHERE request_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids.len() as u64)
}

#[async_trait]
impl SqlStore for PgStore {
    type Db = Postgres;
    const KIND: &'static str = "postgres";
    const SNAPSHOT: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY");

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn reserve_request(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        let rate = with_retries!(self.reserve_once(&op))?;
        flush_wal(&self.pool)
            .await
            .map_err(|e| GovError::Unavailable(format!("cannot make the write durable: {e}")))?;
        Ok(rate)
    }

    async fn finish_request(&self, op: FinishOp) -> Result<Finished, GovError> {
        let _in_flight = InFlight::new(&self.finishing);
        self.finish_durably(&op).await
    }

    /// Every write is durable when its call returns; finishes still trying (the database is
    /// busy or away) are waited for, so that a shutdown keeps their records.
    async fn flush_writes(&self) {
        let mut count = self.finishing.subscribe();
        let pending = *count.borrow();
        if pending > 0 {
            tracing::warn!("waiting for {pending} audit records the database has not taken yet");
        }
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Versions are numbered MAX + 1 under a table lock: two replicas recording at once must
    /// not pick the same one.
    async fn config_version_of(
        tx: &mut Transaction<'static, Postgres>,
        config: NewConfig<'_>,
    ) -> Result<i64, GovError> {
        sqlx::query("LOCK TABLE config_versions IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut **tx)
            .await?;
        let known: Option<i64> =
            sqlx::query_scalar("SELECT version FROM config_versions WHERE hash = $1")
                .bind(config.hash)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some(v) = known {
            return Ok(v);
        }
        Ok(sqlx::query_scalar(
            "INSERT INTO config_versions (version, hash, created_ms, author, source)
             SELECT COALESCE(MAX(version), 0) + 1, $1, $2, $3, $4 FROM config_versions
             RETURNING version",
        )
        .bind(config.hash)
        .bind(config.now_ms)
        .bind(config.author)
        .bind(config.source)
        .fetch_one(&mut **tx)
        .await?)
    }
}

#[cfg(test)]
mod tests;
