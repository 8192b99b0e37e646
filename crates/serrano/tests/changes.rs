//! Admin changes through the real server and the CLI on its database: each kind is a record in
//! the audit chain with its actor and values, versions roll back and undo, and a rolled-back
//! policy gives the same request its earlier verdict.

mod common;

use std::process::Command;

use common::{authed_get, Server, ADMIN_KEY};
use serde_json::{json, Value};

fn serrano(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The status of a chat request saying `text` with `key`.
fn says(s: &Server, key: &str, text: &str) -> u16 {
    let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1});
    s.post_as(key, "/v1/chat/completions", body.to_string().as_bytes())
        .0
}

fn ok(s: &Server, path: &str, body: Value) -> Value {
    let (st, v) = s.post(path, &body);
    assert_eq!(st, 200, "{path}: {v}");
    v
}

fn change_records(s: &Server) -> Vec<Value> {
    let (st, v) = s.get("/admin/v1/audit?limit=1000");
    assert_eq!(st, 200, "{v}");
    let all = v["data"].as_array().unwrap().clone();
    all.into_iter()
        .filter(|r| r["method"] == "CHANGE")
        .collect()
}

#[test]
fn admin_changes_are_audited_versioned_and_reversible() {
    let s = Server::tiny(&[]);
    s.tenant("acme");
    let key = s.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    let blocked = "This is Forbidden.";
    assert_eq!(says(&s, &key, blocked), 200);

    // Two versions of a policy: the first blocks the request, the second does not.
    let strict = json!({"blocked_terms": ["forbidden"]});
    let v1 = ok(&s, "/admin/v1/tenants/acme/policy", strict.clone());
    assert_eq!(says(&s, &key, blocked), 400);
    let v2 = ok(
        &s,
        "/admin/v1/tenants/acme/policy",
        json!({"pii": "redact"}),
    );
    assert_eq!(says(&s, &key, blocked), 200);
    let (first, second) = (
        v1["change"].as_i64().unwrap(),
        v2["change"].as_i64().unwrap(),
    );
    let diff = authed_get(&s.url(&format!("/admin/v1/changes/diff?from={first}&to={second}")))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        diff.contains("-  \"blocked_terms\"") && diff.contains("+  \"pii\""),
        "{diff}"
    );
    // Rolling back to the first version restores its verdict on the same request; undoing the
    // first change restores what it replaced (no policy).
    let back = ok(
        &s,
        &format!("/admin/v1/changes/{first}/rollback"),
        json!(null),
    );
    assert_eq!(back["action"], format!("rollback to {first}"));
    assert_eq!(back["after"], v1["policy"]);
    assert_eq!(says(&s, &key, blocked), 400);
    ok(&s, &format!("/admin/v1/changes/{first}/undo"), json!(null));
    assert_eq!(says(&s, &key, blocked), 200);
    let (st, v) = s.get("/admin/v1/changes?kind=policy");
    assert_eq!(st, 200, "{v}");
    let history = v["data"].as_array().unwrap();
    assert_eq!(history.len(), 4, "{v}");
    assert_eq!(history[0]["action"], format!("undo of {first}"));
    assert_eq!(history[0]["before"], v1["policy"]);

    // Budgets, limits and prices through the API; a key revoked; the routing config applied.
    let budget = json!({"tenant": "acme", "unit": "tokens", "period": "day", "limit": 1000});
    ok(&s, "/admin/v1/budgets", budget);
    let limits = json!({"tenant": "acme", "rpm": 100});
    ok(&s, "/admin/v1/limits", limits);
    let price = json!({"model": "tiny", "input_per_million": 1.5, "output_per_million": 2.0});
    let p = ok(&s, "/admin/v1/prices", price);
    let other = s.key("acme", json!({}))["id"].as_i64().unwrap();
    ok(&s, &format!("/admin/v1/keys/{other}/revoke"), json!(null));
    let config = s.get("/admin/v1/config").1["source"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ureq::post(&s.url("/admin/v1/config"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_string(&config)
        .unwrap();
    assert_eq!(r.status(), 200);
    // A change that is not a version cannot be rolled back; a bad value changes nothing.
    let (st, v) = s.post(
        &format!("/admin/v1/changes/{}/rollback", p["change"]),
        &json!(null),
    );
    assert_eq!(st, 200, "a price is a version: {v}");
    let events = s.get("/admin/v1/changes?kind=key").1;
    let revoke = events["data"][0]["id"].as_i64().unwrap();
    let (st, v) = s.post(
        &format!("/admin/v1/changes/{revoke}/rollback"),
        &json!(null),
    );
    assert_eq!(st, 400, "{v}");
    let before = change_records(&s).len();
    let bad = json!({"tenant": "acme", "rpm": -1});
    assert_eq!(s.post("/admin/v1/limits", &bad).0, 400);
    assert_eq!(change_records(&s).len(), before);

    // The CLI on the same database: attributed to the operating-system user and host.
    let db = s.db.to_str().unwrap().to_string();
    let (done, _, err) = serrano(&[
        "admin", "budget", "set", "--db", &db, "--tenant", "acme", "--unit", "tokens", "--period",
        "day", "--limit", "500",
    ]);
    assert!(done, "{err}");
    let budgets = s.get("/admin/v1/budgets?tenant=acme").1;
    assert_eq!(budgets["data"][0]["limit"], 500, "{budgets}");
    let (done, out, err) = serrano(&["admin", "change", "list", "--db", &db, "--kind", "budget"]);
    assert!(done, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    let by_cli = &listed[0];
    let actor = by_cli["actor"].as_str().unwrap();
    assert!(actor.starts_with("cli:") && actor.contains('@'), "{actor}");
    assert_eq!(
        (by_cli["before"].clone(), by_cli["after"].clone()),
        (json!(1000), json!(500))
    );
    let (done, _, err) = serrano(&[
        "admin",
        "change",
        "undo",
        "--db",
        &db,
        &by_cli["id"].to_string(),
    ]);
    assert!(done, "{err}");
    assert_eq!(
        s.get("/admin/v1/budgets?tenant=acme").1["data"][0]["limit"],
        1000
    );

    // Every kind is in the chain, with who and what; the chain verifies.
    let records = change_records(&s);
    let kinds: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap())
        .collect();
    for kind in [
        "tenant", "key", "policy", "budget", "limits", "price", "config",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    let api = records.iter().find(|r| r["endpoint"] == "policy").unwrap();
    // The admin key's shown prefix (an operator-chosen key's is `ext-` and a digest).
    assert!(api["key"].as_str().unwrap().starts_with("ext-"), "{api}");
    assert_eq!(api["change"]["after"], v1["policy"]);
    assert_eq!(api["tenant"], "acme");
    let cli = records
        .iter()
        .filter(|r| r["key"].as_str().is_some_and(|k| k.starts_with("cli:")))
        .count();
    assert_eq!(cli, 2, "the CLI's set and undo");
    let key_created = records.iter().find(|r| r["endpoint"] == "key").unwrap();
    assert!(
        !key_created.to_string().contains(&key),
        "a key's secret is never recorded: {key_created}"
    );
    assert_eq!(s.get("/admin/v1/audit/verify").1["ok"], true);
    let (done, _, err) = serrano(&["audit", "verify", "--db", &db]);
    assert!(done, "{err}");
}
