//! The PostgreSQL store against a real server (see `pgtest.rs`): the store contract, and the
//! guarantees that only matter with several processes: replicas share budgets, limits and one
//! audit chain.

use std::sync::Arc;

use super::*;
use crate::audit::{verify_chain, AuditRecord};
use crate::pgtest::TestPg;
use crate::storage::conformance::{finish_op, reserve_op};
use crate::storage::Store;
use crate::types::{Limits, TenantInfo};

async fn store(pg: &TestPg) -> PgStore {
    PgStore::connect(pg.url(), &GovConfig::new("unused".into()))
        .await
        .unwrap()
}

fn server() -> TestPg {
    TestPg::start().unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_to_the_store_contract() {
    let pg = server();
    crate::storage::conformance::check(&store(&pg).await).await;
}

/// 200 requests at once, half through each of two replicas, against one token budget and one
/// money budget: neither is ever overspent, every settled token is in the budget's spend, and
/// the audit log is one chain of 200 records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_budgets_and_one_audit_chain() {
    let pg = server();
    let replicas = [Arc::new(store(&pg).await), Arc::new(store(&pg).await)];
    let s = &replicas[0];
    s.insert_tenant("t", Retention::Hash, now_ms())
        .await
        .unwrap();
    let t = s.tenant("t").await.unwrap().unwrap();
    // Worst case 20 tokens: 1,000 tokens fit 50 requests at once, 10,000 n$ fit 25 at the
    // dearer backend's price (20 n$ a token, from the fallback), and settling frees room.
    let tokens = 1_000;
    let money = 10_000;
    s.set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Total, tokens)
        .await
        .unwrap();
    s.set_budget(t.id, 0, BudgetUnit::Usd, BudgetPeriod::Day, money)
        .await
        .unwrap();
    s.set_price("m", "local", 10, 10).await.unwrap();
    s.set_price("m", "remote", 20, 20).await.unwrap();
    let mut tasks = vec![];
    for i in 0..200u64 {
        let s = replicas[i as usize % 2].clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("r{i}");
            let admitted = s.reserve(reserve_op(&id, t.id, 5, 15)).await;
            let used = match &admitted {
                Ok(_) => Some((5, i % 16)),
                Err(GovError::OverBudget(_)) => None,
                Err(e) => panic!("{e}"),
            };
            s.finish(finish_op(&id, &t, used)).await.unwrap();
            used
        }));
    }
    let mut settled_tokens = 0;
    let mut admitted = 0;
    for task in tasks {
        if let Some((p, c)) = task.await.unwrap() {
            settled_tokens += (p + c) as i64;
            admitted += 1;
        }
    }
    assert!(admitted > 0 && admitted < 200, "{admitted} admitted");
    let budgets = s.budgets(Some("t"), now_ms()).await.unwrap();
    let (tok, usd) = (&budgets[0], &budgets[1]);
    assert!(tok.spent <= tokens, "{tok:?}");
    assert!(usd.spent <= money, "{usd:?}");
    assert_eq!((tok.reserved, usd.reserved), (0, 0));
    assert_eq!(tok.spent, settled_tokens);
    // Charged at the price of the backend that ran it.
    assert_eq!(usd.spent, settled_tokens * 10);
    let usage = s.usage(&[]).await.unwrap();
    assert_eq!(usage[0].requests, admitted);
    assert_eq!(
        usage[0].prompt_tokens + usage[0].completion_tokens,
        settled_tokens
    );
    let (rows, head) = replicas[1].audit_chain().await.unwrap();
    let audited: i64 = rows
        .iter()
        .map(|r| {
            serde_json::from_str::<AuditRecord>(&r.record)
                .unwrap()
                .cost_nusd
        })
        .sum();
    assert_eq!(audited, usd.spent);
    assert_eq!(verify_chain(rows, head).unwrap(), 200);
    let state = s.ledger_state().await.unwrap();
    assert_eq!((state.open_requests, state.reserved_total), (0, 0));
}

/// A concurrency limit counts the open requests of every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_concurrency_limits() {
    let pg = server();
    let replicas = [Arc::new(store(&pg).await), Arc::new(store(&pg).await)];
    let s = &replicas[0];
    s.insert_tenant("t", Retention::None, now_ms())
        .await
        .unwrap();
    let t = s.tenant("t").await.unwrap().unwrap();
    let limits = Limits {
        rpm: None,
        tpm: None,
        max_concurrent: Some(5),
        ..Limits::default()
    };
    s.set_limits(t.id, 0, limits).await.unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = replicas[i % 2].clone();
            tokio::spawn(async move { s.reserve(reserve_op(&format!("r{i}"), t.id, 1, 1)).await })
        })
        .collect();
    let mut open = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(info) => {
                assert!(info.is_some());
                open += 1;
            }
            Err(GovError::RateLimited { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(open, 5);
    assert_eq!(s.ledger_state().await.unwrap().open_requests, 5);
}

/// A reservation whose process died is released by the sweeper; if its request settles after
/// all, the usage is charged to the current window (the request did run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_reservations_are_released() {
    let pg = server();
    let s = store(&pg).await;
    s.insert_tenant("t", Retention::None, now_ms())
        .await
        .unwrap();
    let t = s.tenant("t").await.unwrap().unwrap();
    s.set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Month, 100)
        .await
        .unwrap();
    let mut op = reserve_op("dead", t.id, 10, 50);
    op.expires_ms = now_ms() - 1;
    s.reserve(op).await.unwrap();
    assert_eq!(s.ledger_state().await.unwrap().reserved_total, 60);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.ledger_state().await.unwrap().open_requests > 0 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = s.ledger_state().await.unwrap();
    assert_eq!((state.reserved_total, state.spent_total), (0, 0));
    s.finish(finish_op("dead", &t, Some((10, 5))))
        .await
        .unwrap();
    let state = s.ledger_state().await.unwrap();
    assert_eq!((state.reserved_total, state.spent_total), (0, 15));
    // Settled once: a second settlement charges nothing.
    let again = s
        .finish(finish_op("dead", &t, Some((10, 5))))
        .await
        .unwrap();
    assert_eq!(again.cost_nusd, 0);
    assert_eq!(s.ledger_state().await.unwrap().spent_total, 15);
}

/// Reservations and audit records commit asynchronously and are answered only after a WAL
/// flush: a server crash right after the answers loses none of them, even on a server whose
/// default is `synchronous_commit = off`. (Without the flush the last records of a burst are
/// still in PostgreSQL's WAL buffers when it dies.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_writes_survive_a_server_crash() {
    let pg = server();
    let s = store(&pg).await;
    // The store must not depend on the server's default: with it off, a plain commit (and a
    // flush committed at the session's default) would return before the WAL is on disk.
    sqlx::query("ALTER SYSTEM SET synchronous_commit = off")
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&s.pool)
        .await
        .unwrap();
    drop(s);
    let s = store(&pg).await;
    let plain = PgPool::connect(pg.url()).await.unwrap();
    let default: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&plain)
        .await
        .unwrap();
    assert_eq!(default, "off");
    s.insert_tenant("t", Retention::None, now_ms())
        .await
        .unwrap();
    let t = s.tenant("t").await.unwrap().unwrap();
    s.set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Month, 1_000_000)
        .await
        .unwrap();
    const N: usize = 40;
    // Two per round: one settled (its record answered), one left reserved (its reservation
    // answered), so that both kinds of answer are the last write before the crash.
    let mut reserve_only = Vec::new();
    for i in 0..N {
        let done = format!("done-{i}");
        s.reserve(reserve_op(&done, t.id, 10, 50)).await.unwrap();
        s.finish(finish_op(&done, &t, Some((10, 5)))).await.unwrap();
        let open = format!("open-{i}");
        s.reserve(reserve_op(&open, t.id, 10, 50)).await.unwrap();
        reserve_only.push(open);
    }
    pg.crash_and_restart().unwrap();
    drop(s);
    let s = store(&pg).await;
    let (rows, head) = s.audit_chain().await.unwrap();
    assert_eq!(rows.len(), N, "audit records lost in the crash");
    assert_eq!(verify_chain(rows, head).unwrap(), N as u64);
    let state = s.ledger_state().await.unwrap();
    assert_eq!(state.spent_total, 15 * N as i64);
    assert_eq!(
        state.open_requests, N as i64,
        "reservations lost in the crash"
    );
    assert_eq!(state.reserved_total, 60 * N as i64);
}

/// Requests and tokens per minute are counted in the store's windows: the fourth request of a
/// minute with `rpm = 3` is refused, and so is one whose worst case would pass `tpm`, on
/// either replica, with the headers' numbers computed from the windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_rate_windows() {
    let pg = server();
    let replicas = [store(&pg).await, store(&pg).await];
    let s = &replicas[0];
    s.insert_tenant("r", Retention::None, now_ms())
        .await
        .unwrap();
    let t = s.tenant("r").await.unwrap().unwrap();
    let limits = Limits {
        rpm: Some(3),
        tpm: Some(1_000),
        max_concurrent: None,
        ..Limits::default()
    };
    s.set_limits(t.id, 0, limits).await.unwrap();
    // All in one minute, so that the counts below are this minute's alone.
    let into_minute = now_ms().rem_euclid(60_000);
    if into_minute > 50_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - into_minute) as u64 + 50)).await;
    }
    let too_many = replicas[1].reserve(reserve_op("big", t.id, 600, 500)).await;
    assert!(
        matches!(too_many, Err(GovError::RateLimited { .. })),
        "{too_many:?}"
    );
    for i in 0..3 {
        let info = replicas[i % 2]
            .reserve(reserve_op(&format!("r{i}"), t.id, 10, 50))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(info.remaining_requests, 2 - i as i64);
        assert_eq!(info.remaining_tokens, 1_000 - 60 * (i as i64 + 1));
    }
    let fourth = replicas[1].reserve(reserve_op("r3", t.id, 10, 50)).await;
    assert!(
        matches!(fourth, Err(GovError::RateLimited { .. })),
        "{fourth:?}"
    );
    // A settlement gives back the unused worst case to the tokens window, not the request.
    s.finish(finish_op("r0", &t, Some((10, 5)))).await.unwrap();
    let windows: (i64, i64) =
        sqlx::query_as("SELECT SUM(requests)::bigint, SUM(tokens)::bigint FROM rate_windows")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(windows, (3, 60 * 3 - 45));
}

/// The shortest busy timeout the store takes (`connect` raises shorter ones to it).
const BUSY: Duration = Duration::from_secs(1);

async fn busy_store(pg: &TestPg) -> Arc<PgStore> {
    let mut config = GovConfig::new("unused".into());
    config.busy_timeout = BUSY;
    Arc::new(PgStore::connect(pg.url(), &config).await.unwrap())
}

/// A tenant with a budget and one open reservation, `r1`.
async fn one_reserved(s: &PgStore) -> TenantInfo {
    s.insert_tenant("t", Retention::Hash, now_ms())
        .await
        .unwrap();
    let t = s.tenant("t").await.unwrap().unwrap();
    s.set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Total, 1_000)
        .await
        .unwrap();
    s.reserve(reserve_op("r1", t.id, 10, 50)).await.unwrap();
    t
}

/// The finish's record is the chain's one record, it verifies, and `r1` was charged once.
async fn landed_once(s: &PgStore) {
    let (rows, head) = s.audit_chain().await.unwrap();
    assert_eq!(verify_chain(rows, head).unwrap(), 1);
    let state = s.ledger_state().await.unwrap();
    assert_eq!(
        (state.open_requests, state.reserved_total, state.spent_total),
        (0, 0, 15)
    );
}

/// The server processes of the store's connections that wait for a lock.
async fn waiting_on_locks(plain: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'serrano'
         AND wait_event_type = 'Lock'",
    )
    .fetch_all(plain)
    .await
    .unwrap()
}

/// A finish held up by the audit head's lock for several busy timeouts, whose connection is
/// then killed, lands once the lock is let go: its record is not lost, and written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_outlasts_a_held_lock_and_a_lost_connection() {
    let pg = server();
    let s = busy_store(&pg).await;
    let t = one_reserved(&s).await;
    let plain = PgPool::connect(pg.url()).await.unwrap();
    let mut blocker = plain.begin().await.unwrap();
    sqlx::query("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let finish = {
        let (s, t) = (s.clone(), t.clone());
        tokio::spawn(async move { s.finish(finish_op("r1", &t, Some((10, 5)))).await })
    };
    tokio::time::sleep(BUSY * 5 / 2).await;
    assert!(
        !finish.is_finished(),
        "the finish gave up or got past the lock"
    );
    // Its connection lost while it waits (the server kills it): it tries again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let victims = loop {
        let pids = waiting_on_locks(&plain).await;
        if !pids.is_empty() {
            break pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the finish never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for pid in victims {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&plain)
            .await
            .unwrap();
    }
    tokio::time::sleep(BUSY).await;
    assert!(!finish.is_finished());
    blocker.rollback().await.unwrap();
    let fin = tokio::time::timeout(Duration::from_secs(30), finish)
        .await
        .expect("the finish never landed")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() > BUSY * 3);
    assert_eq!((fin.seq, fin.cost_nusd), (1, 0));
    landed_once(&s).await;
}

/// A finish waiting on the head's lock when the server crashes lands once the server is
/// back: every connection of the pool is lost, and new ones are refused while it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_outlasts_a_server_restart() {
    let pg = server();
    let s = busy_store(&pg).await;
    let t = one_reserved(&s).await;
    let plain = PgPool::connect(pg.url()).await.unwrap();
    let mut blocker = plain.begin().await.unwrap();
    sqlx::query("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let finish = {
        let (s, t) = (s.clone(), t.clone());
        tokio::spawn(async move { s.finish(finish_op("r1", &t, Some((10, 5)))).await })
    };
    tokio::time::sleep(BUSY / 2).await;
    tokio::task::block_in_place(|| pg.crash_and_restart()).unwrap();
    drop(blocker);
    let fin = tokio::time::timeout(Duration::from_secs(60), finish)
        .await
        .expect("the finish never landed")
        .unwrap()
        .unwrap();
    assert_eq!(fin.seq, 1);
    landed_once(&s).await;
}

/// With every pooled connection taken for longer than the busy timeout, a reservation fails
/// closed, while a finish (and the flush that waits for it) waits until connections are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_refuses_reservations_and_delays_finishes() {
    let pg = server();
    let s = busy_store(&pg).await;
    let t = one_reserved(&s).await;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(s.pool.acquire().await.unwrap());
    }
    let finish = {
        let (s, t) = (s.clone(), t.clone());
        tokio::spawn(async move { s.finish(finish_op("r1", &t, Some((10, 5)))).await })
    };
    let started = std::time::Instant::now();
    let refused = s.reserve(reserve_op("r2", t.id, 10, 50)).await;
    assert!(
        matches!(refused, Err(GovError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() >= BUSY);
    let flushed = tokio::time::timeout(BUSY, s.flush()).await;
    assert!(flushed.is_err(), "flush returned with a finish in flight");
    assert!(!finish.is_finished(), "the finish gave up");
    drop(held);
    let fin = tokio::time::timeout(Duration::from_secs(30), finish)
        .await
        .expect("the finish never landed")
        .unwrap()
        .unwrap();
    assert_eq!(fin.seq, 1);
    tokio::time::timeout(Duration::from_secs(5), s.flush())
        .await
        .expect("flush waits with nothing in flight");
    landed_once(&s).await;
}

#[test]
fn transient_failures_are_told_from_others() {
    assert!(transient(&sqlx::Error::PoolTimedOut));
    assert!(transient(&sqlx::Error::Io(
        std::io::ErrorKind::ConnectionReset.into()
    )));
    assert!(!transient(&sqlx::Error::PoolClosed));
    assert!(!transient(&sqlx::Error::RowNotFound));
    for code in ["55P03", "57014", "57P01", "08006", "40P01"] {
        assert!(transient_code(code), "{code}");
    }
    for code in ["23505", "42P01", "22P02"] {
        assert!(!transient_code(code), "{code}");
    }
}

#[test]
fn urls_are_shown_without_their_password() {
    assert!(is_postgres_url("postgresql://h/db"));
    assert!(!is_postgres_url("/var/lib/serrano.db"));
    assert_eq!(
        display_db("postgres://u:secret@h:5432/db?sslmode=require"),
        "postgres://u:***@h:5432/db?sslmode=require"
    );
    assert_eq!(display_db("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(display_db("/tmp/x.db"), "/tmp/x.db");
}
