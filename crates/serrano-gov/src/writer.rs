//! The single writer: every ledger and audit write goes through one OS thread that owns a
//! SQLite connection and group-commits.
//!
//! Requests arriving together share one `BEGIN IMMEDIATE ... COMMIT`. A reservation checks
//! every limit and budget before it writes, so a refused one writes nothing and its neighbours
//! commit; what the checks read is cached between transactions (`ledger::Ledger` says when
//! that is exact).
//!
//! Durability is pipelined. The writer commits with `synchronous=NORMAL` (no fsync inside the
//! write lock) and hands the batch's replies to a syncer thread, which fsyncs the WAL file once
//! for every batch committed meanwhile and only then answers: an audit record is on disk before
//! its response completes, exactly as with `synchronous=FULL`, but the next batch (a
//! reservation, say) commits while the previous one's fsync is in flight instead of waiting
//! behind it. Reservations are answered at commit: one lost to a power failure belongs to a
//! request that died with it. This is safe because in WAL mode a committed transaction is either
//! still in the WAL (which the syncer's fsync covers) or was copied into the database by a
//! checkpoint, which syncs the WAL before copying and the database after.
//!
//! Checkpoints run on a third thread (`PRAGMA wal_checkpoint(PASSIVE)`, which never takes the
//! write lock, and syncs the database file after copying), so copying WAL pages into the
//! database stalls no commit. Under steady load that thread never catches up with the
//! writer, and only a checkpoint that copied every frame lets the WAL start over; so once the
//! WAL is past [`WAL_RESTART_BYTES`] and a round has copied all it saw, the checkpointer asks
//! the writer to finish the job between two of its transactions, when nothing is queued: it
//! copies only the frames of the last few milliseconds, and the database file it syncs is
//! almost clean. (Left to its own automatic checkpoint at 16 MiB, the writer spent ~25 ms
//! copying frames and ~6 ms syncing a database file dirty with every page copied since the last
//! restart: a ~30 ms stall about every second at 1,000 req/s, which every request queued behind.)
//!
//! Why threads and `rusqlite` rather than a sqlx connection: sqlx-sqlite hands every statement
//! to a worker thread and back; at ~15 statements per request that hop was most of the gateway's
//! CPU time in a profile (futex waits and context switches), while SQLite itself was ~2%.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::audit::{chain_hash, sha256_hex, Retention, GENESIS};
use crate::error::GovError;
use crate::ledger::Ledger;
use crate::rate::RateInfo;
use crate::storage::{FinishOp, Finished, ReserveOp};
use crate::time::now_ms;

/// Most ops committed together.
const MAX_BATCH: usize = 256;
/// Committed batches whose replies may wait for the syncer's next fsync. Past it the writer
/// waits for the syncer, its own queue fills, and new reservations are refused after
/// `--db-busy-timeout`: a disk slower than the commits is backpressure, not unbounded memory.
const MAX_UNSYNCED_BATCHES: usize = 64;
/// How often expired reservations are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Least time between two background checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// WAL size past which the writer makes it start over, once the checkpointer has caught up.
pub const WAL_RESTART_BYTES: i64 = 4 << 20;

pub enum Op {
    Reserve(
        ReserveOp,
        oneshot::Sender<Result<Option<RateInfo>, GovError>>,
    ),
    Finish(Box<FinishOp>, oneshot::Sender<Result<Finished, GovError>>),
    /// Answered once everything queued before it is durable (or failed).
    Barrier(oneshot::Sender<()>),
}

enum Done {
    Barrier(oneshot::Sender<()>),
    Reserved(
        oneshot::Sender<Result<Option<RateInfo>, GovError>>,
        Result<Option<RateInfo>, GovError>,
    ),
    Finished(
        oneshot::Sender<Result<Finished, GovError>>,
        Result<Finished, GovError>,
    ),
}

impl Done {
    fn failed(&mut self, e: &GovError) {
        match self {
            Done::Barrier(_) => {}
            Done::Reserved(_, r) => *r = Err(e.clone()),
            Done::Finished(_, r) => *r = Err(e.clone()),
        }
    }
    /// Whether the answer must wait for the fsync: audit records, and barriers (which promise
    /// that everything before them is durable).
    fn needs_sync(&self) -> bool {
        matches!(self, Done::Barrier(_) | Done::Finished(_, Ok(_)))
    }
    fn send(self) {
        // A requester that gave up no longer needs its answer.
        match self {
            Done::Barrier(tx) => drop(tx.send(())),
            Done::Reserved(tx, r) => drop(tx.send(r)),
            Done::Finished(tx, r) => drop(tx.send(r)),
        }
    }
}

/// Runs until every sender is gone. `conn` must be in WAL mode with `synchronous=NORMAL`;
/// `checkpointer` is a second connection to the same database, whose WAL is the file `wal`.
pub fn run(conn: Connection, checkpointer: Connection, wal: PathBuf, rx: flume::Receiver<Op>) {
    let (sync_tx, sync_rx) = flume::bounded::<Vec<Done>>(MAX_UNSYNCED_BATCHES);
    let (tick_tx, tick_rx) = flume::bounded::<()>(1);
    let restart_due = Arc::new(AtomicBool::new(false));
    let syncer = std::thread::Builder::new()
        .name("serrano-gov-sync".into())
        .spawn(move || sync_loop(wal, sync_rx));
    let due = restart_due.clone();
    let checkpoints = std::thread::Builder::new()
        .name("serrano-gov-ckpt".into())
        .spawn(move || checkpoint_loop(checkpointer, tick_rx, &due));
    if let Err(e) = syncer.as_ref().and(checkpoints.as_ref()) {
        // Without a syncer nothing can be made durable: refuse every write.
        tracing::error!("cannot start the governance store's threads: {e}");
        let e = GovError::Unavailable("the store's sync thread did not start".into());
        for op in rx.iter() {
            fail(op, &e).send();
        }
        return;
    }
    let mut ledger = Ledger::default();
    let mut next_sweep = Instant::now();
    loop {
        let first = match rx.recv_timeout(SWEEP_EVERY) {
            Ok(op) => Some(op),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        if Instant::now() >= next_sweep {
            if let Err(e) = sweep(&conn, &mut ledger) {
                tracing::warn!("cannot expire stale reservations: {e}");
            }
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
        let Some(first) = first else { continue };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let (later, now): (Vec<Done>, Vec<Done>) = apply(&conn, &mut ledger, batch)
            .into_iter()
            .partition(Done::needs_sync);
        for d in now {
            d.send();
        }
        if !later.is_empty() && sync_tx.send(later).is_err() {
            tracing::error!("the governance store's sync thread stopped");
        }
        // Between transactions, so that it copies every frame and the next write starts the
        // WAL over; and only with nothing queued, so that the few milliseconds it takes (two
        // fsyncs) hold up no waiting batch. A failure only means the WAL grows until the next
        // try, and the automatic checkpoint at 16 MiB is the backstop under endless load.
        if rx.is_empty() && restart_due.swap(false, Ordering::Relaxed) {
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!("WAL checkpoint failed: {e}");
            }
        }
        let _ = tick_tx.try_send(());
    }
    // Dropping the senders ends both helper threads once they have drained.
}

/// Answers batches once the WAL is on disk: one fsync for everything committed before it.
fn sync_loop(wal: PathBuf, rx: flume::Receiver<Vec<Done>>) {
    while let Ok(first) = rx.recv() {
        let mut pending = first;
        while let Ok(more) = rx.try_recv() {
            pending.extend(more);
        }
        // Opened per sync, not kept: SQLite deletes the WAL when the last connection to the
        // database closes and creates it again on the next open, and an fsync through a kept
        // descriptor would then sync a file nobody writes.
        let synced = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .and_then(|f| f.sync_data());
        if let Err(e) = synced {
            tracing::error!("cannot sync {}: {e}", wal.display());
            let e = GovError::Unavailable(format!("cannot make the audit write durable: {e}"));
            for d in &mut pending {
                d.failed(&e);
            }
        }
        for d in pending {
            d.send();
        }
    }
}

/// Copies committed WAL pages into the database after commits, at most every
/// [`CHECKPOINT_EVERY`]; PASSIVE, so it never waits for or blocks the writer (SQLite syncs the
/// WAL before copying and the database after). Once a round has copied every frame it saw of
/// a WAL past [`WAL_RESTART_BYTES`], it asks the writer to finish the job.
fn checkpoint_loop(conn: Connection, ticks: flume::Receiver<()>, restart_due: &AtomicBool) {
    let page = conn
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .unwrap_or(4096);
    while ticks.recv().is_ok() {
        // (busy, frames in the WAL, frames copied into the database), as this round saw them.
        let round = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match round {
            Ok((frames, copied)) => {
                if frames == copied && frames.saturating_mul(page) >= WAL_RESTART_BYTES {
                    restart_due.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
        }
        std::thread::sleep(CHECKPOINT_EVERY);
    }
}

/// The file SQLite keeps beside the database with this suffix (`-wal`, `-shm`).
pub fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Runs a cached statement without results (transaction control included), so that no
/// statement is parsed again per batch.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs `f` in its own write transaction, with the ledger's cache checked first and dropped if
/// the transaction fails (it may hold writes that were rolled back).
fn in_transaction<T>(
    conn: &Connection,
    ledger: &mut Ledger,
    f: impl FnOnce(&Connection, &mut Ledger) -> Result<T, GovError>,
) -> Result<T, GovError> {
    exec(conn, "BEGIN IMMEDIATE")?;
    let done = ledger
        .begin(conn)
        .and_then(|()| f(conn, ledger))
        .and_then(|t| Ok(exec(conn, "COMMIT").map(|()| t)?));
    match done {
        Ok(t) => Ok(t),
        Err(e) => {
            ledger.forget();
            // The error is what the caller needs; a failed rollback leaves nothing to undo.
            let _ = exec(conn, "ROLLBACK");
            Err(e)
        }
    }
}

fn sweep(conn: &Connection, ledger: &mut Ledger) -> Result<(), GovError> {
    let n = in_transaction(conn, ledger, |c, l| l.expire(c, now_ms()))?;
    if n > 0 {
        tracing::warn!("released the reservations of {n} expired requests");
    }
    Ok(())
}

fn apply(conn: &Connection, ledger: &mut Ledger, batch: Vec<Op>) -> Vec<Done> {
    let mut done = Vec::with_capacity(batch.len());
    let mut ops = batch.into_iter();
    if let Err(e) = in_transaction(conn, ledger, |c, l| apply_each(c, l, &mut ops, &mut done)) {
        tracing::error!("governance store write failed: {e}");
        for d in &mut done {
            d.failed(&e);
        }
        // Every op gets an answer, even those the transaction never reached.
        done.extend(ops.map(|op| fail(op, &e)));
    }
    done
}

/// Applies each op of a batch. A refusal (over budget, rate limited, a replay) is that op's
/// answer and wrote nothing; a store error abandons the whole transaction, since the op may
/// have written part of its rows (there are no per-op savepoints: they cost two statements and
/// a copy of every page per op).
fn apply_each(
    conn: &Connection,
    ledger: &mut Ledger,
    ops: &mut impl Iterator<Item = Op>,
    done: &mut Vec<Done>,
) -> Result<(), GovError> {
    let now = now_ms();
    for op in ops {
        let d = match op {
            Op::Barrier(tx) => Done::Barrier(tx),
            Op::Reserve(r, reply) => match ledger.reserve(conn, &r, now) {
                Err(e @ GovError::Unavailable(_)) => {
                    done.push(Done::Reserved(reply, Err(e.clone())));
                    return Err(e);
                }
                res => Done::Reserved(reply, res),
            },
            Op::Finish(f, reply) => match finish(conn, ledger, &f, now) {
                Ok(fin) => Done::Finished(reply, Ok(fin)),
                Err(e) => {
                    done.push(Done::Finished(reply, Err(e.clone())));
                    return Err(e);
                }
            },
        };
        done.push(d);
    }
    Ok(())
}

fn fail(op: Op, e: &GovError) -> Done {
    match op {
        Op::Barrier(tx) => Done::Barrier(tx),
        Op::Reserve(_, tx) => Done::Reserved(tx, Err(e.clone())),
        Op::Finish(_, tx) => Done::Finished(tx, Err(e.clone())),
    }
}

fn head(conn: &Connection) -> Result<(i64, String), GovError> {
    Ok(conn
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, GENESIS.to_string())))
}

/// Settles (if the request reserved) and appends the audit record.
fn finish(
    conn: &Connection,
    ledger: &mut Ledger,
    f: &FinishOp,
    now: i64,
) -> Result<Finished, GovError> {
    let cost = match &f.settlement {
        Some(s) => ledger.settle(conn, s, now)?,
        None => 0,
    };
    let head = match ledger.head.take() {
        Some(h) => h,
        None => head(conn)?,
    };
    let seq = head.0 as u64 + 1;
    let mut record = f.record.clone();
    record.seq = seq;
    record.time_ms = now;
    record.cost_nusd = cost;
    let text = serde_json::to_string(&record)
        .map_err(|e| GovError::Unavailable(format!("cannot encode an audit record: {e}")))?;
    let hash = chain_hash(&head.1, seq, &text);
    conn.prepare_cached(
        "INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq as i64, text, head.1, hash])?;
    conn.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )?
    .execute(params![seq as i64, hash])?;
    if let Some(c) = &f.content {
        let (prompt, completion) = match c.retention {
            Retention::None => (None, None),
            Retention::Hash => (Some(sha256_hex(&c.prompt)), Some(sha256_hex(&c.completion))),
            Retention::Full => (Some(c.prompt.clone()), Some(c.completion.clone())),
        };
        if c.retention != Retention::None {
            conn.prepare_cached(
                "INSERT INTO audit_content (seq, tenant_id, retention, prompt, completion)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                seq as i64,
                c.tenant_id,
                c.retention.as_str(),
                prompt,
                completion
            ])?;
        }
    }
    ledger.head = Some((seq as i64, hash));
    Ok(Finished {
        seq,
        cost_nusd: cost,
    })
}
