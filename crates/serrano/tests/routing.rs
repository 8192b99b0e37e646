//! Routing across processes on loopback: real `serrano serve` nodes labelled `eu` and `us` behind a
//! `serrano gateway --config`, and scripted upstreams where the test is about the gateway's own
//! decisions (latency-driven spill-over, canary shares).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, wait_until, Server, Stub, ADMIN_KEY};
use serde_json::{json, Value};

/// A node serving the tiny model as `tiny`, without keys (the gateway is the front door).
fn node(region: &str, port: Option<u16>) -> Server {
    let port = port.map(|p| p.to_string());
    let mut args = vec![
        "--served-model-name",
        "tiny",
        "--allow-anonymous",
        "--region",
        region,
    ];
    if let Some(p) = &port {
        args.extend(["--port", p.as_str()]);
    }
    Server::tiny(&args)
}

const FAST_HEALTH: &str = "[health]\ninterval_ms = 150\ntimeout_ms = 500\nfailures_to_down = 2\n\n[breaker]\nfailure_ratio = 0.5\nmin_requests = 4\nwindow_ms = 1000\ncooldown_ms = 500\n";

fn backend(name: &str, url: &str, region: &str, tier: &str, extra: &str) -> String {
    format!(
        "[[backend]]\nname = \"{name}\"\nurl = \"{url}/v1\"\nregion = \"{region}\"\ntier = \"{tier}\"\nmodels = [\"tiny\"]\n{extra}\n"
    )
}

fn chat(model: &str) -> Vec<u8> {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
        .to_string()
        .into_bytes()
}

fn key_for(gw: &Server, tenant: &str) -> String {
    gw.tenant(tenant);
    gw.key(tenant, json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string()
}

fn backend_view(gw: &Server, name: &str) -> Value {
    let (_, v) = gw.get("/admin/v1/backends");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap()
}

fn inference_records(gw: &Server) -> Vec<Value> {
    let (_, v) = gw.get("/admin/v1/audit?limit=1000");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "/v1/chat/completions")
        .cloned()
        .collect()
}

#[test]
fn a_tenant_restricted_to_eu_is_never_served_from_us() {
    let us = node("us", None);
    let eu = node("eu", None);
    // `us` first: without the residency rule, every request would go there.
    let config = format!(
        "[routing]\nstrategy = \"priority\"\n\n{FAST_HEALTH}\n{}\n{}\n[tenant.euro]\nregions = [\"eu\"]\n",
        backend("us", &us.base, "us", "gpu", ""),
        backend("eu", &eu.base, "eu", "cpu", ""),
    );
    let gw = Server::gateway_with_config(&config, &[]);
    let euro = key_for(&gw, "euro");
    let world = key_for(&gw, "world");
    for _ in 0..5 {
        let (st, v, h) = gw.post_as(&euro, "/v1/chat/completions", &chat("tiny"));
        assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "eu"), "{v}");
        let (st, v, h) = gw.post_as(&world, "/v1/chat/completions", &chat("tiny"));
        assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "us"), "{v}");
    }
    let crashed = eu.kill();
    // Before the health checks notice, attempts fail on eu and are never retried outside it.
    for _ in 0..3 {
        let (st, v, h) = gw.post_as(&euro, "/v1/chat/completions", &chat("tiny"));
        assert_ne!(st, 200, "{v}");
        assert_ne!(h.get("x-serrano-backend").map(String::as_str), Some("us"));
    }
    assert!(wait_until(Duration::from_secs(10), || {
        backend_view(&gw, "eu")["healthy"] == false
    }));
    let (st, v, _) = gw.post_as(&euro, "/v1/chat/completions", &chat("tiny"));
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_backend_available");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("eu down"), "{msg}");
    // Others are still served.
    let (st, _, h) = gw.post_as(&world, "/v1/chat/completions", &chat("tiny"));
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "us"));

    let records = inference_records(&gw);
    let euro_records: Vec<&Value> = records.iter().filter(|r| r["tenant"] == "euro").collect();
    assert_eq!(euro_records.len(), 9);
    for r in euro_records {
        assert!(r["backend"] == "eu" || r["status"] == 503, "{r}");
        assert!(r["region"] == "eu" || r["region"].is_null(), "{r}");
        assert_eq!(r["config_version"], 1, "{r}");
    }
    drop(crashed);
}

#[test]
fn a_killed_backend_fails_over_and_its_breaker_closes_when_it_returns() {
    let port = free_port();
    let a = node("eu", Some(port));
    let b = node("eu", None);
    let config = format!(
        "{FAST_HEALTH}\n{}\n{}",
        backend("a", &a.base, "eu", "gpu", ""),
        backend("b", &b.base, "eu", "cpu", ""),
    );
    let gw = Arc::new(Server::gateway_with_config(&config, &[]));
    let key = key_for(&gw, "acme");
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (gw, key, stop, statuses) =
                (gw.clone(), key.clone(), stop.clone(), statuses.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let (st, v, h) = gw.post_as(&key, "/v1/chat/completions", &chat("tiny"));
                    let backend = h.get("x-serrano-backend").cloned().unwrap_or_default();
                    statuses.lock().unwrap().push((st, backend, v.to_string()));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let crashed = a.kill();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = backend_view(&gw, "a");
            v["breaker_opened"].as_u64() >= Some(1) && v["healthy"] == false
        }),
        "{}",
        backend_view(&gw, "a")
    );
    std::thread::sleep(Duration::from_millis(500));
    let a = Server::restart(
        crashed,
        &[
            "--served-model-name",
            "tiny",
            "--allow-anonymous",
            "--region",
            "eu",
            "--port",
            &port.to_string(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = backend_view(&gw, "a");
            v["breaker"] == "closed" && v["healthy"] == true
        }),
        "{}",
        backend_view(&gw, "a")
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let statuses = statuses.lock().unwrap();
    let failed: Vec<_> = statuses.iter().filter(|(st, _, _)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        statuses.len(),
        failed.first()
    );
    let on = |name: &str| statuses.iter().filter(|(_, b, _)| b == name).count();
    assert!(on("a") > 0 && on("b") > 0, "a {} b {}", on("a"), on("b"));
    // Back in service: priority sends traffic to `a` again.
    let (st, _, h) = gw.post_as(&key, "/v1/chat/completions", &chat("tiny"));
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "a"));
    let (_, metrics) = (
        0,
        ureq::get(&gw.url("/metrics"))
            .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    );
    assert!(
        metrics.contains("serrano_backend_requests_total{backend=\"a\",outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("serrano_backend_breaker_state{backend=\"a\"} 0"),
        "{metrics}"
    );
    drop(a);
}

#[test]
fn cheapest_within_slo_spills_over_when_the_cheap_backend_slows_and_comes_back() {
    // The cheap one slows down with load: 60 ms alone, 340 ms with 8 requests in flight.
    let cheap = Stub::start("cheap", 20, 40);
    let fast = Stub::start("fast", 5, 0);
    let config = format!(
        "[routing]\nstrategy = \"cheapest-within-slo\"\nstale_after_ms = 1000\nslo = {{ ttft_p95_ms = 150 }}\n\n\
         [[backend]]\nname = \"cheap\"\nurl = \"{}\"\nregion = \"eu\"\ntier = \"cpu\"\nmodels = [\"m\"]\nprice = {{ input = 0.1, output = 0.2 }}\n\n\
         [[backend]]\nname = \"fast\"\nurl = \"{}\"\nregion = \"eu\"\ntier = \"gpu\"\nmodels = [\"m\"]\nprice = {{ input = 1.0, output = 2.0 }}\n",
        cheap.url, fast.url
    );
    let gw = Arc::new(Server::gateway_with_config(&config, &[]));
    let key = key_for(&gw, "acme");
    for _ in 0..10 {
        let (st, v, h) = gw.post_as(&key, "/v1/chat/completions", &chat("m"));
        assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "cheap"), "{v}");
    }
    assert_eq!((cheap.hits(), fast.hits()), (10, 0));
    let routes = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (gw, key, routes) = (gw.clone(), key.clone(), routes.clone());
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (st, _, h) = gw.post_as(&key, "/v1/chat/completions", &chat("m"));
                    assert_eq!(st, 200);
                    routes.lock().unwrap().push(h["x-serrano-route"].clone());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (c, f) = (cheap.hits() - 10, fast.hits());
    assert!(c > 0 && f > c, "under load: cheap {c}, fast {f}");
    let routes = routes.lock().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with("cheapest-within-slo: fast")
                && r.contains("cheaper cheap over SLO")),
        "{routes:?}"
    );
    // No fresh samples: the cheap one is tried again, and alone it meets the SLO.
    std::thread::sleep(Duration::from_millis(1200));
    let (st, _, h) = gw.post_as(&key, "/v1/chat/completions", &chat("m"));
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "cheap"));
}

#[test]
fn a_weighted_canary_gets_its_share() {
    let canary = Stub::start("canary", 0, 0);
    let stable = Stub::start("stable", 0, 0);
    let config = format!(
        "[[backend]]\nname = \"canary\"\nurl = \"{}\"\nregion = \"eu\"\ntier = \"gpu\"\nmodels = [\"m\"]\n\n\
         [[backend]]\nname = \"stable\"\nurl = \"{}\"\nregion = \"eu\"\ntier = \"gpu\"\nmodels = [\"m\"]\n\n\
         [[route]]\nmodel = \"m\"\nstrategy = \"weighted\"\nweights = {{ canary = 10, stable = 90 }}\n",
        canary.url, stable.url
    );
    let gw = Server::gateway_with_config(&config, &[]);
    let key = key_for(&gw, "acme");
    let mut on_canary = 0;
    for _ in 0..1000 {
        let (st, v, h) = gw.post_as(&key, "/v1/chat/completions", &chat("m"));
        assert_eq!(st, 200, "{v}");
        on_canary += usize::from(h["x-serrano-backend"] == "canary");
    }
    assert!(
        (70..=130).contains(&on_canary),
        "canary got {on_canary} of 1000"
    );
    assert_eq!(
        (canary.hits(), stable.hits()),
        (on_canary, 1000 - on_canary)
    );
}

fn versioned_config(first: &str, second: &str, a: &Server, b: &Server) -> String {
    format!(
        "{}\n{}\n[[route]]\nmodel = \"tiny\"\nstrategy = \"priority\"\nbackends = [\"{first}\", \"{second}\"]\n",
        backend("a", &a.base, "eu", "gpu", ""),
        backend("b", &b.base, "eu", "cpu", ""),
    )
}

fn serrano(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args(args)
        .env("SERRANO_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap()
}

fn post_text(gw: &Server, path: &str, body: &str) -> (u16, Value) {
    let r = ureq::post(&gw.url(path))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_string(body);
    let (st, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn configs_are_versions_that_reload_and_roll_back_without_dropping_requests() {
    let a = node("eu", None);
    let b = node("eu", None);
    let v1 = versioned_config("a", "b", &a, &b);
    let v2 = versioned_config("b", "a", &a, &b);
    let gw = Arc::new(Server::gateway_with_config(&v1, &[]));
    let key = key_for(&gw, "acme");
    let served_by = |gw: &Server| {
        let (st, v, h) = gw.post_as(&key, "/v1/chat/completions", &chat("tiny"));
        assert_eq!(st, 200, "{v}");
        h["x-serrano-backend"].clone()
    };
    assert_eq!(served_by(&gw), "a");

    // Requests keep flowing through every switch below.
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let load = {
        // A tenant of its own, so the ordered records below are only the sequential requests'.
        let key = key_for(&gw, "load");
        let (gw, stop, bad) = (gw.clone(), stop.clone(), bad.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (st, v, _) = gw.post_as(&key, "/v1/chat/completions", &chat("tiny"));
                if st != 200 {
                    bad.lock().unwrap().push(v);
                }
            }
        })
    };

    // A bad config is refused with its line and field; the old one keeps serving.
    let typo = v1.replacen("region = \"eu\"", "regoin = \"eu\"", 1);
    let (st, v) = post_text(&gw, "/admin/v1/config", &typo);
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "backend[0].regoin", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("line 4"),
        "{v}"
    );
    let unknown = v1.replace("backends = [\"a\", \"b\"]", "backends = [\"a\", \"c\"]");
    let (st, v) = post_text(&gw, "/admin/v1/config", &unknown);
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no backend 'c'"),
        "{v}"
    );
    assert_eq!(gw.get("/admin/v1/config").1["version"], 1);
    assert_eq!(served_by(&gw), "a");

    let (st, v) = post_text(&gw, "/admin/v1/config", &v2);
    assert_eq!((st, &v["version"]), (200, &json!(2)), "{v}");
    assert_eq!(served_by(&gw), "b");
    let (st, v) = gw.post("/admin/v1/config/rollback", &json!({"version": 1}));
    assert_eq!((st, &v["version"]), (200, &json!(1)), "{v}");
    assert_eq!(served_by(&gw), "a", "the first request after the rollback");

    // SIGHUP re-reads the file.
    std::fs::write(gw.config_path(), &v2).unwrap();
    let kill = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(wait_until(Duration::from_secs(10), || gw
        .get("/admin/v1/config")
        .1["version"]
        == 2));
    assert_eq!(served_by(&gw), "b");

    // The CLI: check a file, read history and diffs from the database, roll back over HTTP.
    let bad_file = gw.config_path().with_file_name("bad.toml");
    std::fs::write(&bad_file, &typo).unwrap();
    let out = serrano(&["config", "check", bad_file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("line 4") && err.contains("backend[0].regoin"),
        "{err}"
    );
    let out = serrano(&["config", "check", gw.config_path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = gw.db.to_str().unwrap().to_string();
    let out = serrano(&["config", "diff", "1", "2", "--db", &db]);
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("-backends = [\"a\", \"b\"]") && diff.contains("+backends = [\"b\", \"a\"]"),
        "{diff}"
    );
    let out = serrano(&["config", "rollback", "1", "--url", &gw.base]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(served_by(&gw), "a");

    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert!(bad.lock().unwrap().is_empty(), "{:?}", bad.lock().unwrap());

    let (_, history) = gw.get("/admin/v1/config/history");
    let events: Vec<(u64, String)> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().unwrap(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = [
        (1, "apply"),
        (2, "apply"),
        (1, "rollback"),
        (2, "reload"),
        (1, "rollback"),
    ]
    .iter()
    .map(|(v, a)| (*v, a.to_string()))
    .collect();
    assert_eq!(events, expected);
    assert_eq!(history["versions"].as_array().unwrap().len(), 2);
    // Each request's record carries the version that routed it, in order.
    let mut versions: Vec<u64> = inference_records(&gw)
        .iter()
        .filter(|r| r["tenant"] == "acme")
        .map(|r| r["config_version"].as_u64().unwrap())
        .collect();
    versions.dedup();
    assert_eq!(versions, [1, 2, 1, 2, 1]);
}

#[test]
fn the_worked_example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["routing.toml", "sim-tier.toml"] {
        let example = root.join("examples").join(name);
        let out = serrano(&["config", "check", example.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A sim backend's device is checked against the catalog, by name.
    let sim = std::fs::read_to_string(root.join("examples/sim-tier.toml")).unwrap();
    let bad = std::env::temp_dir().join(format!("bad-sim-{}.toml", std::process::id()));
    std::fs::write(&bad, sim.replace("\"inference-asic\"", "\"tpu-v9\"")).unwrap();
    let out = serrano(&["config", "check", bad.to_str().unwrap()]);
    let _ = std::fs::remove_file(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no device 'tpu-v9'"),
        "{err}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let path = std::env::temp_dir().join(format!("readme-routing-{}.toml", std::process::id()));
    std::fs::write(&path, block).unwrap();
    let out = serrano(&["config", "check", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 backends"), "{text}");
}
