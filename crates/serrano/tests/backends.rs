//! The local engine is a router backend like any other. Behind `serrano serve --config`, it shares
//! load with a remote serrano node under `least-loaded` and shows its in-flight count; a full
//! local engine falls back to the remote, and a dead remote to the local engine. One process
//! serves several local models, one engine each. A simulated device (`kind = "sim"`) is a
//! backend too: the engine's tokens at the device's pace, or filler at it.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{wait_until, Server, ADMIN_KEY};
use serde_json::{json, Value};
use serrano_engine::testing::TinyModel;

/// Big enough that a few hundred tokens take a while, so streams overlap.
fn slow() -> TinyModel {
    TinyModel {
        d_model: 256,
        d_ff: 512,
        n_layers: 4,
        context_length: 2048,
        ..Default::default()
    }
}

/// A serrano node serving the slow model as `tiny`, without keys (the front door has them).
fn remote() -> Server {
    Server::random(
        slow(),
        &["--served-model-name", "tiny", "--allow-anonymous"],
    )
}

const FAST_HEALTH: &str = "[health]\ninterval_ms = 150\ntimeout_ms = 500\nfailures_to_down = 2\n";

/// A config of the local engine and `remote`, in that order unless `remote_first`.
fn config(strategy: &str, remote: &Server, remote_first: bool) -> String {
    let local = "[[backend]]\nname = \"local\"\nkind = \"local\"\nregion = \"here\"\ntier = \"cpu\"\nmodels = [\"tiny\"]\nmax_concurrency = 16\n";
    let remote = format!(
        "[[backend]]\nname = \"remote\"\nurl = \"{}/v1\"\nregion = \"here\"\ntier = \"cpu\"\nmodels = [\"tiny\"]\nmax_concurrency = 16\n",
        remote.base
    );
    let (a, b) = if remote_first {
        (remote.as_str(), local)
    } else {
        (local, remote.as_str())
    };
    format!("[routing]\nstrategy = \"{strategy}\"\n\n{FAST_HEALTH}\n{a}\n{b}")
}

fn backend_view(s: &Server, name: &str) -> Value {
    let (_, v) = s.get("/admin/v1/backends");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Streams a chat completion of `tokens` tokens; returns the backend that served it.
fn stream(url: String, tokens: u32) -> String {
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens, "ignore_eos": true, "stream": true});
    let r = ureq::post(&url)
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .timeout(Duration::from_secs(120))
        .send_json(body)
        .unwrap();
    let backend = r.header("x-serrano-backend").unwrap_or("").to_string();
    let mut text = String::new();
    r.into_reader().read_to_string(&mut text).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    backend
}

fn chat(s: &Server) -> (u16, Value, common::Headers) {
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    s.post_raw("/v1/chat/completions", body.to_string().as_bytes())
}

#[test]
fn least_loaded_spreads_streams_over_the_local_engine_and_a_remote_node() {
    let remote = remote();
    let s = Server::random_with_config(
        slow(),
        &config("least-loaded", &remote, false),
        &["--served-model-name", "tiny"],
    );
    // One short stream to each first (ties go round robin), so neither backend's first
    // request (the engine's start-up calibration, a new upstream connection) is in the burst:
    // a backend slow to start keeps its first streams in flight and is passed over.
    let warm: Vec<String> = (0..2)
        .map(|_| stream(s.url("/v1/chat/completions"), 1))
        .collect();
    assert!(warm.contains(&"local".to_string()) && warm.contains(&"remote".to_string()));
    // All 16 start together and run long enough to overlap even on a loaded machine (each
    // pick then sees the others in flight, which is what least-loaded balances).
    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let url = s.url("/v1/chat/completions");
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                stream(url, 1000)
            })
        })
        .collect();
    // Under load the local backend's slots are counted like any backend's.
    let mut peak = 0;
    assert!(wait_until(Duration::from_secs(30), || {
        peak = peak.max(backend_view(&s, "local")["in_flight"].as_u64().unwrap_or(0));
        peak >= 2
    }));
    let served: Vec<String> = streams.into_iter().map(|h| h.join().unwrap()).collect();
    let local = served.iter().filter(|b| *b == "local").count();
    let remote_n = served.iter().filter(|b| *b == "remote").count();
    assert_eq!(local + remote_n, 16, "{served:?}");
    // Each pick goes to the backend with fewer streams in flight at that moment. When the 16
    // arrive together that alternates (8 and 8, the usual outcome); when a loaded machine
    // spreads their arrivals out, later picks see the earlier streams, and the backend that
    // gets through its streams sooner rightly takes more of the rest (2 and 14 seen in CI).
    // Both take several either way.
    assert!(local >= 2 && remote_n >= 2, "{served:?}");
    assert_eq!(backend_view(&s, "local")["in_flight"], 0);
    // Its warm-up stream and its share of the burst, each counted once (this asserted `>= 4`,
    // more than the `>= 2` above guarantees: it failed when the burst went 2 and 14).
    assert_eq!(
        backend_view(&s, "local")["succeeded"].as_u64(),
        Some(local as u64 + 1),
        "{served:?}"
    );
}

#[test]
fn a_full_local_engine_falls_back_to_the_remote() {
    let remote = remote();
    // One sequence at a time and one waiting: a tenant holds at most two in flight locally.
    let s = Server::random_with_config(
        slow(),
        &config("priority", &remote, false),
        &[
            "--served-model-name",
            "tiny",
            "--max-num-seqs",
            "1",
            "--max-waiting",
            "1",
        ],
    );
    let (st, v, h) = chat(&s);
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "local"), "{v}");
    // One after the other: the engine takes a request off its one-slot queue between steps.
    let long: Vec<_> = (1..=2)
        .map(|n| {
            let url = s.url("/v1/chat/completions");
            let h = std::thread::spawn(move || stream(url, 1500));
            assert!(wait_until(Duration::from_secs(30), || {
                backend_view(&s, "local")["in_flight"] == n
            }));
            h
        })
        .collect();
    let (st, v, h) = chat(&s);
    assert_eq!(
        (st, h["x-serrano-backend"].as_str()),
        (200, "remote"),
        "{v}"
    );
    let route = &h["x-serrano-route"];
    assert!(
        route.contains("fell back to remote after local busy"),
        "{route}"
    );
    for h in long {
        assert_eq!(h.join().unwrap(), "local");
    }
    // Nothing was reserved for the refused attempt beyond the one request's record.
    assert_eq!(s.get("/admin/v1/ledger").1["open_requests"], 0);
}

#[test]
fn a_dead_remote_falls_back_to_the_local_engine() {
    let remote = remote();
    let s = Server::random_with_config(
        slow(),
        &config("priority", &remote, true),
        &["--served-model-name", "tiny"],
    );
    let (st, v, h) = chat(&s);
    assert_eq!(
        (st, h["x-serrano-backend"].as_str()),
        (200, "remote"),
        "{v}"
    );
    drop(remote);
    // Before and after the health checks notice, the local engine serves.
    for _ in 0..3 {
        let (st, v, h) = chat(&s);
        assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "local"), "{v}");
    }
    assert!(wait_until(Duration::from_secs(10), || {
        backend_view(&s, "remote")["healthy"] == false
    }));
    let (st, _, h) = chat(&s);
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "local"));
}

#[test]
fn one_process_serves_two_local_models_one_engine_each() {
    let dir = tempfile::tempdir().unwrap();
    let b_path = dir.path().join("b.gguf");
    TinyModel {
        context_length: 512,
        seed: 7,
        ..Default::default()
    }
    .write(&b_path)
    .unwrap();
    let cfg = format!(
        "[[backend]]\nname = \"a\"\nkind = \"local\"\nregion = \"here\"\ntier = \"cpu\"\nmodels = [\"a\"]\n\n[[backend]]\nname = \"b\"\nkind = \"local\"\nmodel = \"{}\"\nregion = \"here\"\ntier = \"cpu\"\n",
        b_path.display()
    );
    let s = Server::random_with_config(TinyModel::default(), &cfg, &["--served-model-name", "a"]);
    for (model, backend) in [("a", "a"), ("b", "b")] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
        let (st, v, h) = s.post_raw("/v1/chat/completions", body.to_string().as_bytes());
        assert_eq!((st, h["x-serrano-backend"].as_str()), (200, backend), "{v}");
        assert_eq!(v["model"], model);
    }
    // Each engine answers for its own model: context lengths differ.
    let (_, models) = s.get("/v1/models");
    let ctx = |id: &str| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["max_model_len"].clone())
    };
    assert_eq!((ctx("a"), ctx("b")), (Some(json!(256)), Some(json!(512))));
    let (st, t) = s.post("/tokenize", &json!({"model": "b", "prompt": "hi"}));
    assert_eq!((st, t["max_model_len"].as_u64()), (200, Some(512)), "{t}");
    let (st, _) = s.post("/tokenize", &json!({"model": "nope", "prompt": "hi"}));
    assert_eq!(st, 404);
    // /metrics names both engines, each metric family once.
    let text = s.metrics_text();
    assert!(text.contains("model_name=\"a\"") && text.contains("model_name=\"b\""));
    let families = text
        .lines()
        .filter(|l| *l == "# TYPE serrano:num_requests_running gauge")
        .count();
    assert_eq!(families, 1, "{text}");
}

/// A `serrano sim calibrate` profile whose every step takes `step_s`, with a KV cache of
/// `kv_tokens` positions.
fn profile(dir: &std::path::Path, step_s: f64, kv_tokens: usize) -> std::path::PathBuf {
    let path = dir.join("device.toml");
    let text = format!(
        "name = \"a test device\"\nintercept_s = {step_s}\nprefill_token_s = 0.0\ndecode_seq_s = 0.0\nkv_kilotoken_s = 0.0\nkv_tokens = {kv_tokens}\nmax_num_seqs = 8\nmax_batch_tokens = 512\nprice_per_hour = 1.0\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The `data:` payloads of a streamed completion, each with its arrival (seconds from the send).
fn timed_stream(s: &Server, body: Value) -> Vec<(f64, Value)> {
    let t0 = std::time::Instant::now();
    let r = ureq::post(&s.url("/v1/completions"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .timeout(Duration::from_secs(60))
        .send_json(body)
        .unwrap();
    let mut out = Vec::new();
    let mut reader = std::io::BufReader::new(r.into_reader());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            if data != "[DONE]" {
                out.push((
                    t0.elapsed().as_secs_f64(),
                    serde_json::from_str(data).unwrap(),
                ));
            }
        }
        line.clear();
    }
    out
}

#[test]
fn a_sim_backend_releases_the_engines_own_tokens_at_the_devices_pace() {
    let dir = tempfile::tempdir().unwrap();
    // Every step of the device takes 40 ms; the tiny model's take well under one.
    let device = profile(dir.path(), 0.04, 4096);
    let cfg = format!(
        "[[backend]]\nname = \"cpu\"\nkind = \"local\"\nregion = \"here\"\ntier = \"cpu\"\naliases = {{ fast = \"tiny\" }}\n\n[[backend]]\nname = \"asic\"\nkind = \"sim\"\nregion = \"here\"\ntier = \"asic\"\naliases = {{ paced = \"tiny\" }}\nsim = {{ profile = \"{}\" }}\n",
        device.display()
    );
    let s =
        Server::random_with_config(TinyModel::default(), &cfg, &["--served-model-name", "tiny"]);
    let body = |model: &str| {
        json!({"model": model, "prompt": "the sim", "max_tokens": 6, "temperature": 0,
               "ignore_eos": true, "stream": true})
    };
    let text = |chunks: &[(f64, Value)]| {
        chunks
            .iter()
            .map(|(_, c)| c["choices"][0]["text"].as_str().unwrap_or("").to_string())
            .collect::<String>()
    };
    let fast = timed_stream(&s, body("fast"));
    let paced = timed_stream(&s, body("paced"));
    assert_eq!(text(&paced), text(&fast), "the engine's own tokens");
    // A chunk per token whose text is whole (a partial character waits for the next).
    let times: Vec<f64> = paced
        .iter()
        .filter(|(_, c)| {
            c["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .map(|(t, _)| *t)
        .collect();
    assert!(times.len() >= 4, "{paced:?}");
    // The prompt's step gives the first token, then one step per token: none sooner.
    assert!(times[0] >= 0.035, "first token at {times:?}");
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= 0.03,
            "a token came before its step ended: {times:?}"
        );
    }
    let last = paced.last().map_or(0.0, |(t, _)| *t);
    assert!(last >= 0.2, "six steps of 40 ms took {last} s");
    let (_, view) = s.get("/admin/v1/backends");
    let kinds: Vec<&str> = view["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["local", "sim"]);
    // Its model names reach the engine's own routes.
    let (st, t) = s.post("/tokenize", &json!({"model": "paced", "prompt": "hi"}));
    assert_eq!(st, 200, "{t}");
}

#[test]
fn a_synthetic_sim_backend_streams_filler_at_the_devices_pace_and_refuses_what_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let device = profile(dir.path(), 0.02, 160);
    let spec = format!("sim:{}", device.display());
    let s = Server::tiny(&["--backend", &spec, "--sim-tokens", "synthetic"]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post_raw("/v1/chat/completions", body.to_string().as_bytes())
    };
    let t0 = std::time::Instant::now();
    let (st, v, h) = chat(json!({}));
    assert_eq!((st, h["x-serrano-backend"].as_str()), (200, "sim"), "{v}");
    // Five tokens at 20 ms a step (the prompt's step gives the first).
    assert!(
        t0.elapsed() >= Duration::from_millis(95),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(v["choices"][0]["message"]["content"], " sim".repeat(5));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // Dashboards see the device: its steps and, idle now, nothing running.
    // (The device publishes them after its step's releases: a moment after the last token.)
    let idle = wait_until(Duration::from_secs(5), || {
        let text = s.metrics_text();
        common::metric(&text, "serrano_backend_device_steps") >= 5.0
            && common::metric(&text, "serrano_backend_device_running") == 0.0
    });
    assert!(idle, "{}", s.metrics_text());

    let chunks = timed_stream(
        &s,
        json!({"prompt": "hi", "max_tokens": 3, "n": 2, "stream": true,
               "stream_options": {"include_usage": true}}),
    );
    let per_choice = |i: u64| {
        chunks
            .iter()
            .filter(|(_, c)| c["choices"][0]["index"] == i && c["choices"][0]["text"] == " sim")
            .count()
    };
    assert_eq!((per_choice(0), per_choice(1)), (3, 3), "{chunks:?}");
    assert_eq!(chunks.last().unwrap().1["usage"]["completion_tokens"], 6);

    for (field, extra) in [
        ("stop", json!({"stop": ["x"]})),
        ("logprobs", json!({"logprobs": true})),
        (
            "response_format",
            json!({"response_format": {"type": "json_object"}}),
        ),
    ] {
        let (st, v, _) = chat(extra);
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(field)),
            "{v}"
        );
    }
    // Within the model's context, past the device's KV cache: refused before any work.
    let (st, v, _) = chat(json!({"max_tokens": 200}));
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV cache holds 160"),
        "{v}"
    );
}
