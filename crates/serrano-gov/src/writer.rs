//! The single writer: every ledger and audit write goes through one task that group-commits.
//!
//! Requests arriving together share one `BEGIN IMMEDIATE ... COMMIT` (one fsync with
//! `synchronous=FULL`); each op runs under its own savepoint, so one refused reservation does
//! not undo its neighbours. A reply is sent only after the commit, so "Ok" means durable.

use std::time::Duration;

use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{chain_hash, sha256_hex, AuditRecord, Retention, GENESIS};
use crate::error::GovError;
use crate::ledger::{self, ReserveOp, Settlement};
use crate::rate::RateInfo;
use crate::time::now_ms;

/// Most ops committed together.
const MAX_BATCH: usize = 256;
/// How often expired reservations are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Prompt and completion text, kept per the tenant's retention.
#[derive(Debug, Clone)]
pub struct Content {
    pub tenant_id: i64,
    pub retention: Retention,
    pub prompt: String,
    pub completion: String,
}

#[derive(Debug)]
pub struct FinishOp {
    pub settlement: Option<Settlement>,
    pub record: AuditRecord,
    pub content: Option<Content>,
}

/// What a finished request was charged and where its record sits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub seq: u64,
    pub cost_nusd: i64,
}

pub enum Op {
    Reserve(
        ReserveOp,
        oneshot::Sender<Result<Option<RateInfo>, GovError>>,
    ),
    Finish(Box<FinishOp>, oneshot::Sender<Result<Finished, GovError>>),
}

enum Done {
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
            Done::Reserved(_, r) => *r = Err(e.clone()),
            Done::Finished(_, r) => *r = Err(e.clone()),
        }
    }
    fn send(self) {
        // A requester that gave up no longer needs its answer.
        match self {
            Done::Reserved(tx, r) => drop(tx.send(r)),
            Done::Finished(tx, r) => drop(tx.send(r)),
        }
    }
}

pub async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Op>) {
    let mut next_sweep = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            op = rx.recv() => match op { Some(op) => Some(op), None => break },
            _ = tokio::time::sleep_until(next_sweep) => None,
        };
        if tokio::time::Instant::now() >= next_sweep {
            if let Err(e) = sweep(&mut conn).await {
                tracing::warn!("cannot expire stale reservations: {e}");
            }
            next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
        }
        let Some(first) = first else { continue };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        for d in apply(&mut conn, batch).await {
            d.send();
        }
    }
}

async fn sweep(conn: &mut SqliteConnection) -> Result<(), GovError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let n = ledger::expire(&mut tx, now_ms()).await?;
    tx.commit().await?;
    if n > 0 {
        tracing::warn!("released the reservations of {n} expired requests");
    }
    Ok(())
}

async fn apply(conn: &mut SqliteConnection, batch: Vec<Op>) -> Vec<Done> {
    let mut done = Vec::with_capacity(batch.len());
    let outcome = apply_in_tx(conn, batch, &mut done).await;
    if let Err(e) = outcome {
        tracing::error!("governance store write failed: {e}");
        for d in &mut done {
            d.failed(&e);
        }
    }
    done
}

async fn apply_in_tx(
    conn: &mut SqliteConnection,
    batch: Vec<Op>,
    done: &mut Vec<Done>,
) -> Result<(), GovError> {
    // Every op gets an answer, even when the transaction cannot start.
    let unavailable = |e: &GovError| GovError::Unavailable(e.to_string());
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            let e = GovError::from(e);
            for op in batch {
                done.push(match op {
                    Op::Reserve(_, tx) => Done::Reserved(tx, Err(unavailable(&e))),
                    Op::Finish(_, tx) => Done::Finished(tx, Err(unavailable(&e))),
                });
            }
            return Err(e);
        }
    };
    let mut head = head(&mut tx).await;
    let now = now_ms();
    for op in batch {
        if let Err(e) = savepoint(&mut tx, "SAVEPOINT op").await {
            done.push(fail(op, &e));
            continue;
        }
        let d = match op {
            Op::Reserve(r, reply) => {
                let res = ledger::reserve(&mut tx, &r, now).await;
                Done::Reserved(reply, res)
            }
            Op::Finish(f, reply) => {
                let res = match &head {
                    Ok(h) => finish(&mut tx, &f, h, now).await,
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
        let ok = match &d {
            Done::Reserved(_, r) => r.is_ok(),
            Done::Finished(_, r) => r.is_ok(),
        };
        let end = if ok {
            savepoint(&mut tx, "RELEASE op").await
        } else {
            match savepoint(&mut tx, "ROLLBACK TO op").await {
                Ok(()) => savepoint(&mut tx, "RELEASE op").await,
                Err(e) => Err(e),
            }
        };
        done.push(d);
        end?;
    }
    tx.commit().await?;
    Ok(())
}

fn fail(op: Op, e: &GovError) -> Done {
    match op {
        Op::Reserve(_, tx) => Done::Reserved(tx, Err(e.clone())),
        Op::Finish(_, tx) => Done::Finished(tx, Err(e.clone())),
    }
}

async fn savepoint(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), GovError> {
    sqlx::query(sql).execute(&mut *conn).await?;
    Ok(())
}

async fn head(conn: &mut SqliteConnection) -> Result<(i64, String), GovError> {
    let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, GENESIS.to_string()),
    })
}

/// Settles (if the request reserved) and appends the audit record, in the caller's savepoint.
async fn finish(
    conn: &mut SqliteConnection,
    f: &FinishOp,
    head: &(i64, String),
    now: i64,
) -> Result<(Finished, String), GovError> {
    let cost = match &f.settlement {
        Some(s) => ledger::settle(conn, s, now).await?,
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
    sqlx::query("INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4)")
        .bind(seq as i64)
        .bind(&text)
        .bind(&head.1)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )
    .bind(seq as i64)
    .bind(&hash)
    .execute(&mut *conn)
    .await?;
    if let Some(c) = &f.content {
        let (prompt, completion) = match c.retention {
            Retention::None => (None, None),
            Retention::Hash => (Some(sha256_hex(&c.prompt)), Some(sha256_hex(&c.completion))),
            Retention::Full => (Some(c.prompt.clone()), Some(c.completion.clone())),
        };
        if c.retention != Retention::None {
            sqlx::query(
                "INSERT INTO audit_content (seq, tenant_id, retention, prompt, completion)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(seq as i64)
            .bind(c.tenant_id)
            .bind(c.retention.as_str())
            .bind(prompt)
            .bind(completion)
            .execute(&mut *conn)
            .await?;
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
