//! Gateway replicas on one PostgreSQL database (a real server, see `serrano_gov::pgtest`):
//! a budget is one budget however many replicas serve its tenant, the audit log is one chain,
//! and the CLI works on the same database.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::Server;
use serde_json::{json, Value};
use serrano_gov::pgtest::TestPg;

fn completion(max_tokens: u32) -> Vec<u8> {
    json!({"prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": true})
        .to_string()
        .into_bytes()
}

#[test]
fn replicas_on_postgres_share_one_budget_and_one_audit_chain() {
    let pg = TestPg::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&model)
        .unwrap();
    let db = PathBuf::from(pg.url());
    let args = ["--max-num-seqs", "32"];
    let a = Server::start_with_db(&model, &args, db.clone(), tempfile::tempdir().unwrap());
    let b = Server::start_with_db(&model, &args, db, tempfile::tempdir().unwrap());
    a.tenant("acme");
    let key = a.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    const BUDGET: u64 = 3_000;
    let (st, v) = a.post(
        "/admin/v1/budgets",
        &json!({"tenant": "acme", "unit": "tokens", "period": "day", "limit": BUDGET}),
    );
    assert_eq!(st, 200, "{v}");
    let replicas = [Arc::new(a), Arc::new(b)];
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let (s, key) = (replicas[i % 2].clone(), key.clone());
            std::thread::spawn(move || s.post_as(&key, "/v1/completions", &completion(20)))
        })
        .collect();
    let mut codes = std::collections::BTreeMap::new();
    let mut used = 0u64;
    for h in handles {
        let (st, v, _) = h.join().unwrap();
        *codes.entry(st).or_insert(0) += 1;
        match st {
            200 => used += v["usage"]["total_tokens"].as_u64().unwrap(),
            429 => assert_eq!(v["error"]["code"], "budget_exceeded", "{v}"),
            _ => panic!("unexpected {st}: {v}"),
        }
    }
    assert!(codes[&200] > 10 && codes.contains_key(&429), "{codes:?}");
    // Either replica sees the one ledger and the one chain.
    let (_, l) = replicas[1].get("/admin/v1/ledger");
    assert_eq!(
        (l["open_requests"].as_i64(), l["reserved_total"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(l["spent_total"].as_u64().unwrap() <= BUDGET, "{l}");
    assert_eq!(l["spent_total"].as_u64().unwrap(), used);
    let (st, v) = replicas[0].get("/admin/v1/audit?limit=1000");
    assert_eq!(st, 200, "{v}");
    let inference: Vec<&Value> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "/v1/completions")
        .collect();
    assert_eq!(inference.len(), 200);
    let audited: u64 = inference
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["prompt_tokens"].as_u64().unwrap() + r["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(audited, used);
    assert_eq!(replicas[1].get("/admin/v1/audit/verify").1["ok"], true);

    // The CLI on the same database; a password never reaches its output.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_serrano"))
            .args(args)
            .args(["--db", pg.url()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let verified: Value = serde_json::from_str(&cli(&["audit", "verify"])).unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    let usage: Value =
        serde_json::from_str(&cli(&["usage", "--group-by", "tenant", "--format", "json"])).unwrap();
    let row = &usage[0];
    assert_eq!(
        row["prompt_tokens"].as_u64().unwrap() + row["completion_tokens"].as_u64().unwrap(),
        used,
        "{usage}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args([
            "usage",
            "--db",
            "postgres://u:hunter2-secret@127.0.0.1:1/db",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        said.contains("u:***@127.0.0.1") && !said.contains("hunter2"),
        "{said}"
    );
}
