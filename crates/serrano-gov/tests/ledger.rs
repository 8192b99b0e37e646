//! The ledger and audit log against a real SQLite file.

use std::time::Duration;

use serrano_gov::{
    BudgetPeriod, BudgetUnit, GovConfig, GovError, Governance, NewKey, Principal, Retention, Ticket,
};

async fn open(dir: &tempfile::TempDir) -> Governance {
    let gov = Governance::open(GovConfig::new(dir.path().join("gov.db")))
        .await
        .unwrap();
    gov.bootstrap(None).await.unwrap();
    gov
}

/// Sets a budget as an admin change would (`limit` in tokens, or nano-dollars for `usd`).
async fn budget(
    gov: &Governance,
    tenant: &str,
    key_id: Option<i64>,
    unit: BudgetUnit,
    period: BudgetPeriod,
    limit: i64,
) {
    let target = serrano_gov::Target::Budget {
        tenant: tenant.into(),
        key_id,
        unit,
        period,
    };
    gov.change("test", target, serde_json::json!(limit))
        .await
        .unwrap();
}

/// Sets rate limits as an admin change would.
async fn limits(gov: &Governance, tenant: &str, key_id: Option<i64>, l: serrano_gov::Limits) {
    let target = serrano_gov::Target::Limits {
        tenant: tenant.into(),
        key_id,
    };
    gov.change("test", target, serde_json::to_value(l).unwrap())
        .await
        .unwrap();
}

async fn tenant_key(gov: &Governance, name: &str) -> Principal {
    gov.create_tenant(name, Retention::None).await.unwrap();
    let (_, secret) = gov
        .create_key(NewKey {
            tenant: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    gov.authenticate(&secret).await.unwrap()
}

/// One simulated request: reserve `prompt + max`, then use `used` completion tokens.
async fn request(
    gov: &Governance,
    p: &Principal,
    id: String,
    prompt: u64,
    max: u64,
    used: u64,
) -> Result<(), GovError> {
    let t = Ticket::new(gov, id, "POST", "/v1/completions");
    t.set_principal(p.clone());
    t.set_model("m");
    t.set_route("local", "here", "test", 1);
    let r = match t.reserve(prompt, max).await {
        Ok(r) => r,
        Err(e) => {
            t.finish(429, Some(e.to_string())).await.unwrap();
            return Err(e);
        }
    };
    r.accept(true);
    for _ in 0..used {
        t.token(0, "x");
    }
    t.set_finish_reason("length");
    t.finish(200, None).await.unwrap();
    Ok(())
}

/// 200 concurrent requests spread over `govs` (replicas), each reserving 10 + 90 tokens and
/// using between 10 and 100; returns how many were admitted. Refusals must name a day tokens
/// budget.
async fn burst(govs: &[Governance], p: &Principal) -> usize {
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (gov, p) = (govs[i % govs.len()].clone(), p.clone());
            let used = (i % 91) as u64;
            tokio::spawn(async move { request(&gov, &p, format!("r{i}"), 10, 90, used).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(GovError::OverBudget(m)) => assert!(m.contains("day tokens budget"), "{m}"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overspend_a_token_budget() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    const BUDGET: i64 = 5_000;
    budget(
        &gov,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Day,
        BUDGET,
    )
    .await;
    let ok = burst(std::slice::from_ref(&gov), &p).await;
    let state = gov.ledger_state().await.unwrap();
    assert_eq!(state.open_requests, 0);
    assert_eq!(state.reserved_total, 0);
    assert!(state.spent_total <= BUDGET, "{state:?}");
    assert!(ok >= 50, "only {ok} requests were admitted");
    // The settled usage equals what the audit log recorded.
    let usage = gov.usage(&[]).await.unwrap();
    let audited: u64 = gov
        .audit_records(0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    assert_eq!(
        (usage[0].prompt_tokens + usage[0].completion_tokens) as u64,
        audited
    );
    assert_eq!(state.spent_total as u64, audited);
    let v = gov.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(
        v.records, 201,
        "the 200 requests and the budget's admin change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overspend_a_money_budget() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    // $1 per million input tokens, $4 per million output: 1,000 and 4,000 nano-dollars a token.
    gov.set_price("m", "local", 1.0, 4.0).await.unwrap();
    let limit =
        serrano_gov::nusd_per_token(1.0) * 10 * 30 + serrano_gov::nusd_per_token(4.0) * 90 * 30;
    budget(
        &gov,
        "acme",
        Some(p.key_id),
        BudgetUnit::Usd,
        BudgetPeriod::Month,
        limit,
    )
    .await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (gov, p) = (gov.clone(), p.clone());
            tokio::spawn(async move { request(&gov, &p, format!("r{i}"), 10, 90, 90).await })
        })
        .collect();
    let ok = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(Ok(()))))
        .count();
    // Every request uses its whole worst case, so exactly 30 fit.
    assert_eq!(ok, 30);
    let state = gov.ledger_state().await.unwrap();
    assert_eq!((state.open_requests, state.reserved_total), (0, 0));
    assert_eq!(state.spent_total, limit);
    let cost: f64 = gov.usage(&["key"]).await.unwrap()[0].cost_usd;
    assert!((cost - limit as f64 / 1e9).abs() < 1e-9);
}

#[tokio::test]
async fn a_replayed_request_id_is_not_charged_twice() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    budget(
        &gov,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Total,
        1_000,
    )
    .await;
    request(&gov, &p, "same".into(), 10, 10, 10).await.unwrap();
    let e = request(&gov, &p, "same".into(), 10, 10, 10)
        .await
        .unwrap_err();
    assert_eq!(e, GovError::Duplicate("same".into()));
    assert_eq!(gov.ledger_state().await.unwrap().spent_total, 20);
}

#[tokio::test]
async fn a_dropped_ticket_is_audited_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    budget(
        &gov,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Total,
        1_000,
    )
    .await;
    let t = Ticket::new(&gov, "gone".into(), "POST", "/v1/completions");
    t.set_principal(p);
    t.set_model("m");
    t.reserve(10, 100).await.unwrap().accept(true);
    t.token(0, "a");
    drop(t);
    let ok = async {
        loop {
            let s = gov.ledger_state().await.unwrap();
            if s.open_requests == 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(5), ok)
        .await
        .unwrap();
    assert_eq!((s.reserved_total, s.spent_total), (0, 11));
    let recs = gov.audit_records(0, 10).await.unwrap();
    let last = recs.last().unwrap();
    assert_eq!((last.status, last.completion_tokens), (499, 1));
}

/// The settlement rule: nothing is charged until a backend accepts the request; after that,
/// reported usage, else an exact tally, else the whole reservation.
#[tokio::test]
async fn a_reservation_charges_only_once_a_backend_accepted_it() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    budget(
        &gov,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Total,
        1_000_000,
    )
    .await;
    let spent = |gov: Governance| async move { gov.ledger_state().await.unwrap().spent_total };
    let ticket = |id: &str| {
        let t = Ticket::new(&gov, id.into(), "POST", "/v1/completions");
        t.set_principal(p.clone());
        t.set_model("m");
        t
    };
    // Refused by every backend before any accepted it: void, even with tokens counted.
    let t = ticket("void");
    let r = t.reserve(10, 100).await.unwrap();
    t.token(0, "a");
    drop(r);
    t.finish(503, Some("no backend".into())).await.unwrap();
    assert_eq!(spent(gov.clone()).await, 0);
    // Accepted by an upstream that broke off without usage: the worst case.
    let t = ticket("worst");
    let r = t.reserve(10, 100).await.unwrap();
    r.accept(false);
    t.token(0, "a");
    t.finish(502, Some("stream broke".into())).await.unwrap();
    assert_eq!(spent(gov.clone()).await, 110);
    // Accepted, usage reported: the report.
    let t = ticket("reported");
    let r = t.reserve(10, 100).await.unwrap();
    r.accept(false);
    r.set_usage(7, 3);
    t.finish(200, None).await.unwrap();
    assert_eq!(spent(gov.clone()).await, 120);
    // Accepted by the engine, which counts exactly: the tally.
    let t = ticket("tally");
    let r = t.reserve(10, 100).await.unwrap();
    r.accept(true);
    t.token(0, "a");
    t.token(0, "b");
    t.finish(499, None).await.unwrap();
    assert_eq!(spent(gov.clone()).await, 132);
    let recs = gov.audit_records(0, 10).await.unwrap();
    let charged: Vec<(u64, u64)> = recs
        .iter()
        .filter(|r| r.tenant.as_deref() == Some("acme") && r.change.is_none())
        .map(|r| (r.prompt_tokens, r.completion_tokens))
        .collect();
    assert_eq!(charged, [(0, 0), (10, 100), (7, 3), (10, 2)]);
}

#[tokio::test]
async fn expired_reservations_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GovConfig::new(dir.path().join("gov.db"));
    cfg.reservation_ttl = Duration::from_millis(1);
    let gov = Governance::open(cfg).await.unwrap();
    let p = tenant_key(&gov, "acme").await;
    budget(
        &gov,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Total,
        1_000,
    )
    .await;
    let t = Ticket::new(&gov, "crashed".into(), "POST", "/v1/completions");
    t.set_principal(p);
    t.set_model("m");
    let _r = t.reserve(10, 500).await.unwrap();
    // A crashed process never settles: forget the ticket without running its destructor.
    std::mem::forget(t);
    let released = async {
        loop {
            if gov.ledger_state().await.unwrap().reserved_total == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), released)
        .await
        .unwrap();
    assert_eq!(gov.ledger_state().await.unwrap().open_requests, 0);
}

#[tokio::test]
async fn keys_are_checked_revoked_and_expired() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    gov.create_tenant("acme", Retention::None).await.unwrap();
    let (info, secret) = gov
        .create_key(NewKey {
            tenant: "acme".into(),
            models: Some(vec!["m".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    let p = gov.authenticate(&secret).await.unwrap();
    assert!(p.may_use_model("m") && !p.may_use_model("other"));
    let mut wrong = secret.clone();
    wrong.pop();
    wrong.push('!');
    assert!(matches!(
        gov.authenticate(&wrong).await,
        Err(GovError::Unauthorized(_))
    ));
    gov.revoke_key(info.id).await.unwrap();
    assert_eq!(
        gov.authenticate(&secret).await.err(),
        Some(GovError::Unauthorized(
            "This API key has been revoked.".into()
        ))
    );
    let (_, old) = gov
        .create_key(NewKey {
            tenant: "acme".into(),
            expires_ms: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        gov.authenticate(&old).await.err(),
        Some(GovError::Unauthorized("This API key has expired.".into()))
    );
    // The database never holds a secret.
    let raw = std::fs::read(dir.path().join("gov.db")).unwrap();
    let wal = std::fs::read(dir.path().join("gov.db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}

#[tokio::test]
async fn erasure_removes_content_and_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    gov.create_tenant("acme", Retention::Full).await.unwrap();
    let (_, secret) = gov
        .create_key(NewKey {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let p = gov.authenticate(&secret).await.unwrap();
    let t = Ticket::new(&gov, "r1".into(), "POST", "/v1/completions");
    t.set_principal(p);
    t.set_model("m");
    assert!(t.keeps_content());
    t.set_prompt_text("my secret prompt".into());
    t.reserve(3, 5).await.unwrap().accept(true);
    t.token(0, "hello");
    let fin = t.finish(200, None).await.unwrap();
    let (retention, prompt, completion) = gov.audit_content(fin.seq as i64).await.unwrap().unwrap();
    assert_eq!(retention, "full");
    assert_eq!(prompt.as_deref(), Some("my secret prompt"));
    assert_eq!(completion.as_deref(), Some(r#"["hello"]"#));
    assert_eq!(gov.erase_content("acme").await.unwrap(), 1);
    assert_eq!(gov.audit_content(fin.seq as i64).await.unwrap(), None);
    assert!(gov.verify_audit().await.unwrap().ok);
}

/// An attacker with write access rebuilds the whole chain after editing a record (every hash and
/// the head recomputed): the chain alone verifies, but a checkpoint signed before the edit does
/// not, and neither does an exported copy of it after the stored checkpoints are deleted.
#[tokio::test]
async fn signed_checkpoints_catch_a_rebuilt_chain() {
    let dir = tempfile::tempdir().unwrap();
    let gov = open(&dir).await;
    let p = tenant_key(&gov, "acme").await;
    for i in 0..5 {
        request(&gov, &p, format!("r{i}"), 5, 5, 5).await.unwrap();
    }
    let (key, _) = serrano_gov::generate_signing_key();
    let cp = gov.checkpoint(&key).await.unwrap().unwrap();
    assert_eq!(cp.seq, 5);
    assert!(
        gov.checkpoint(&key).await.unwrap().is_none(),
        "same head, no new checkpoint"
    );
    let trusted = key.verifying_key();
    let r = gov.verify_audit_with(Some(&trusted), &[]).await.unwrap();
    assert!(r.ok && r.checkpoints == 1, "{r:?}");

    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("gov.db").display()))
            .await
            .unwrap();
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT seq, record FROM audit_log ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut prev = serrano_gov::GENESIS.to_string();
    for (seq, record) in rows {
        let record = if seq == 2 {
            record.replace("\"completion_tokens\":5", "\"completion_tokens\":1")
        } else {
            record
        };
        let hash = serrano_gov::chain_hash(&prev, seq as u64, &record);
        sqlx::query("UPDATE audit_log SET record = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1")
            .bind(seq)
            .bind(&record)
            .bind(&prev)
            .bind(&hash)
            .execute(&pool)
            .await
            .unwrap();
        prev = hash;
    }
    sqlx::query("UPDATE audit_head SET hash = ?1")
        .bind(&prev)
        .execute(&pool)
        .await
        .unwrap();
    let r = gov.verify_audit_with(Some(&trusted), &[]).await.unwrap();
    assert!(!r.ok && r.first_bad_seq == Some(5), "{r:?}");
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        gov.verify_audit().await.unwrap().ok,
        "without checkpoints the rebuilt chain passes"
    );
    let r = gov.verify_audit_with(Some(&trusted), &[cp]).await.unwrap();
    assert!(!r.ok, "the exported checkpoint catches it: {r:?}");
}

/// Two replicas on one database file, each with its own writer and cache: neither may spend
/// what the other reserved, and each sees the other's open requests and an admin's changes at
/// once (the writer's cache is dropped whenever another connection has committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_file_share_budgets_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir).await;
    let b = Governance::open(GovConfig::new(dir.path().join("gov.db")))
        .await
        .unwrap();
    let p = tenant_key(&a, "acme").await;
    const BUDGET: i64 = 5_000;
    budget(
        &a,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Day,
        BUDGET,
    )
    .await;
    let ok = burst(&[a.clone(), b.clone()], &p).await;
    let state = b.ledger_state().await.unwrap();
    assert_eq!((state.open_requests, state.reserved_total), (0, 0));
    assert!(state.spent_total <= BUDGET, "{state:?}");
    assert!(ok >= 50, "only {ok} requests were admitted");

    // One request open on replica a fills the tenant's one concurrent slot for replica b.
    limits(
        &a,
        "acme",
        None,
        serrano_gov::Limits {
            max_concurrent: Some(1),
            ..Default::default()
        },
    )
    .await;
    budget(
        &a,
        "acme",
        None,
        BudgetUnit::Tokens,
        BudgetPeriod::Day,
        i64::MAX / 4,
    )
    .await;
    let held = Ticket::new(&a, "held".into(), "POST", "/v1/completions");
    held.set_principal(p.clone());
    held.set_model("m");
    let _held = held.reserve(1, 1).await.unwrap();
    let refused = request(&b, &p, "on-b".into(), 1, 1, 1).await;
    assert!(
        matches!(refused, Err(GovError::RateLimited { .. })),
        "{refused:?}"
    );
    held.finish(200, None).await.unwrap();
    request(&b, &p, "on-b-again".into(), 1, 1, 1).await.unwrap();
    request(&a, &p, "on-a".into(), 1, 1, 1).await.unwrap();

    // A budget lowered by an admin applies to the very next reservation on both replicas.
    budget(&a, "acme", None, BudgetUnit::Tokens, BudgetPeriod::Day, 0).await;
    for (gov, id) in [(&a, "after-a"), (&b, "after-b")] {
        let r = request(gov, &p, id.into(), 1, 1, 1).await;
        assert!(matches!(r, Err(GovError::OverBudget(_))), "{r:?}");
    }
    assert_eq!(a.ledger_state().await.unwrap().reserved_total, 0);
    let v = a.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
}
