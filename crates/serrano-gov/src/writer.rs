//! The single writer: every ledger and audit write goes through one OS thread that owns a
//! SQLite connection and group-commits.
//!
//! Requests arriving together share one `BEGIN IMMEDIATE ... COMMIT`; each op runs under its own
//! savepoint, so one refused reservation does not undo its neighbours. A reply is sent only after
//! the commit. Batches holding an audit record commit with `synchronous=FULL` (durable before
//! the response completes); reservation-only batches with `NORMAL`: a reservation lost to a power
//! failure belongs to a request that died with it, and the next FULL commit syncs the WAL anyway.
//!
//! Why a thread and `rusqlite` rather than a sqlx connection: sqlx-sqlite hands every statement
//! to a worker thread and back; at ~15 statements per request that hop was most of the gateway's
//! CPU time in a profile (futex waits and context switches), while SQLite itself was ~2%.

use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use crate::audit::{chain_hash, sha256_hex, Retention, GENESIS};
use crate::error::GovError;
use crate::ledger;
use crate::rate::RateInfo;
use crate::storage::{FinishOp, Finished, ReserveOp};
use crate::time::now_ms;

/// Most ops committed together.
const MAX_BATCH: usize = 256;
/// How often expired reservations are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub enum Op {
    Reserve(
        ReserveOp,
        oneshot::Sender<Result<Option<RateInfo>, GovError>>,
    ),
    Finish(Box<FinishOp>, oneshot::Sender<Result<Finished, GovError>>),
    /// Answered once everything queued before it is committed (or failed).
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
    fn ok(&self) -> bool {
        match self {
            Done::Barrier(_) => true,
            Done::Reserved(_, r) => r.is_ok(),
            Done::Finished(_, r) => r.is_ok(),
        }
    }
    fn failed(&mut self, e: &GovError) {
        match self {
            Done::Barrier(_) => {}
            Done::Reserved(_, r) => *r = Err(e.clone()),
            Done::Finished(_, r) => *r = Err(e.clone()),
        }
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

/// Runs until every sender is gone.
pub fn run(mut conn: Connection, rx: flume::Receiver<Op>) {
    let mut next_sweep = Instant::now();
    let mut full = true;
    loop {
        let first = match rx.recv_timeout(SWEEP_EVERY) {
            Ok(op) => Some(op),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        if Instant::now() >= next_sweep {
            if let Err(e) = sweep(&mut conn) {
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
        let durable = batch.iter().any(|op| matches!(op, Op::Finish(..)));
        if durable != full {
            let mode = if durable { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => full = durable,
                Err(e) => tracing::error!("cannot set synchronous={mode}: {e}"),
            }
        }
        // Never report an audit record durable unless the FULL setting took.
        let batch = if durable && !full {
            let e = GovError::Unavailable("cannot make the audit write durable".into());
            batch.into_iter().map(|op| fail(op, &e)).collect()
        } else {
            apply(&mut conn, batch)
        };
        for d in batch {
            d.send();
        }
    }
}

fn sweep(conn: &mut Connection) -> Result<(), GovError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = ledger::expire(&tx, now_ms())?;
    tx.commit()?;
    if n > 0 {
        tracing::warn!("released the reservations of {n} expired requests");
    }
    Ok(())
}

fn apply(conn: &mut Connection, batch: Vec<Op>) -> Vec<Done> {
    let mut done = Vec::with_capacity(batch.len());
    if let Err(e) = apply_in_tx(conn, batch, &mut done) {
        tracing::error!("governance store write failed: {e}");
        for d in &mut done {
            d.failed(&e);
        }
    }
    done
}

fn apply_in_tx(
    conn: &mut Connection,
    batch: Vec<Op>,
    done: &mut Vec<Done>,
) -> Result<(), GovError> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Every op gets an answer, even when the transaction cannot start.
            let e = GovError::from(e);
            done.extend(batch.into_iter().map(|op| fail(op, &e)));
            return Err(e);
        }
    };
    let mut head = head(&tx);
    let now = now_ms();
    for op in batch {
        let sp = match tx.savepoint() {
            Ok(sp) => sp,
            Err(e) => {
                done.push(fail(op, &e.into()));
                continue;
            }
        };
        let d = match op {
            Op::Barrier(tx) => Done::Barrier(tx),
            Op::Reserve(r, reply) => Done::Reserved(reply, ledger::reserve(&sp, &r, now)),
            Op::Finish(f, reply) => {
                let res = match &head {
                    Ok(h) => finish(&sp, &f, h, now),
                    Err(e) => Err(e.clone()),
                };
                let res = res.map(|(fin, hash)| {
                    if let Ok(h) = &mut head {
                        *h = (fin.seq as i64, hash);
                    }
                    fin
                });
                Done::Finished(reply, res)
            }
        };
        // A failed op's savepoint rolls back when dropped.
        let end = if d.ok() { sp.commit() } else { Ok(()) };
        done.push(d);
        end?;
    }
    tx.commit()?;
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

/// Settles (if the request reserved) and appends the audit record, in the caller's savepoint.
fn finish(
    conn: &Connection,
    f: &FinishOp,
    head: &(i64, String),
    now: i64,
) -> Result<(Finished, String), GovError> {
    let cost = match &f.settlement {
        Some(s) => ledger::settle(conn, s, now)?,
        None => 0,
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
    Ok((
        Finished {
            seq,
            cost_nusd: cost,
        },
        hash,
    ))
}
