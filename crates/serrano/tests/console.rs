//! The web console at `/ui` in headless Chromium (Debian's package, driven by Playwright's
//! Python client): after a load run every chart has data and every table rows, a rollback
//! clicked in the page changes the active config version, and a screenshot is kept
//! (`target/ci-artifacts/console.png`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{Server, ADMIN_KEY};
use serde_json::{json, Value};

fn chromium() {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "the console test needs Chromium: apt-get install chromium (.ci/run does)"
    );
}

#[test]
fn the_console_shows_the_fleet_and_rolls_a_config_back() {
    chromium();
    let py = common::python_venv(
        "uienv",
        &["playwright==1.65.2"],
        "import playwright.sync_api",
    );
    let s = Server::tiny(&[]);
    // The files are served without a key, with a policy that allows nothing from elsewhere.
    let page = ureq::get(&s.url("/ui")).call().unwrap();
    let csp = page.header("content-security-policy").unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(page.into_string().unwrap().contains("serrano"));
    // Without a key the data is not.
    assert!(ureq::get(&s.url("/admin/v1/config")).call().is_err());

    // A tenant with a budget, a second config version, and some load.
    s.tenant("acme");
    let budget = json!({"tenant": "acme", "unit": "tokens", "period": "day", "limit": 10000});
    assert_eq!(s.post("/admin/v1/budgets", &budget).0, 200);
    let key = s.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    let source = s.get("/admin/v1/config").1["source"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ureq::post(&s.url("/admin/v1/config"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_string(&format!("{source}\n# a second version\n"))
        .unwrap();
    assert_eq!(r.into_json::<Value>().unwrap()["version"], 2);
    for n in 0..8 {
        let body = json!({"prompt": format!("hello {n}"), "max_tokens": 8, "ignore_eos": true});
        let (st, v, _) = s.post_as(&key, "/v1/completions", body.to_string().as_bytes());
        assert_eq!(st, 200, "{v}");
    }

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ci-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&shot);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console_driver.py");
    let out = Command::new(py)
        .arg(script)
        .args([s.base.as_str(), ADMIN_KEY, shot.to_str().unwrap(), "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["errors"], json!([]), "{seen}");
    for (chart, points) in seen["points"].as_object().unwrap() {
        assert!(points.as_u64().unwrap() > 0, "{chart} has no data: {seen}");
    }
    for (table, rows) in seen["rows"].as_object().unwrap() {
        assert!(rows.as_u64().unwrap() >= 1, "{table} is empty: {seen}");
    }
    let verified = seen["verified"].as_str().unwrap();
    assert!(verified.starts_with("chain verified"), "{seen}");
    assert_eq!(seen["status"], "rolled back to config version 1", "{seen}");
    // The click changed the server's active version.
    assert_eq!(s.get("/admin/v1/config").1["version"], 1);
    let history = s.get("/admin/v1/config/history").1;
    let last = history["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (last["version"].clone(), last["action"].clone()),
        (json!(1), json!("rollback"))
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(png.len() > 50_000, "a screenshot of {} bytes", png.len());
}
