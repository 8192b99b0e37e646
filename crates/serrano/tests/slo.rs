//! Stall-free steps on the real binary: while a sequence decodes, a long prompt arriving is
//! prefilled in pieces the step-time model says fit the inter-token target, not in
//! `--max-batch-tokens` chunks. A random-weight model and a target no step can meet (so the
//! cap is its floor, 16 tokens, on any machine): the test checks the scheduler's arithmetic
//! from the step log, not a machine's speed.

mod common;

use std::time::Duration;

use common::{wait_until, Server};
use serde_json::{json, Value};

const LOCAL: &str =
    "[[backend]]\nname = \"local\"\nkind = \"local\"\nregion = \"here\"\ntier = \"cpu\"\n";

/// Where the inter-token target comes from in a run.
enum Target<'a> {
    /// `--itl-target-ms`, for every tenant.
    Flag(&'a str),
    /// The tenant's `slo` in the routing config (`--itl-target-ms 0`: none by default).
    TenantSlo(&'a str),
}

/// The step log of a run where a 1,200-token prompt arrives while another request decodes,
/// both from tenant `web`; and the server, for its metrics.
fn steps_with_a_long_prompt_during_a_decode(target: Target) -> (Vec<Value>, Server) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps.jsonl");
    let log_arg = log.to_string_lossy().to_string();
    let mut args = vec![
        "--step-log",
        &log_arg,
        "--no-prefix-caching",
        "--itl-target-ms",
    ];
    let s = match target {
        Target::Flag(ms) => {
            args.push(ms);
            Server::slow(&args)
        }
        Target::TenantSlo(ms) => {
            args.push("0");
            let config = format!(
                "{LOCAL}\n[tenant.web]\nslo = {{ itl_p95_ms = {ms}, ttft_p95_ms = {ms} }}\n"
            );
            Server::random_with_config(common::slow_model(), &config, &args)
        }
    };
    s.tenant("web");
    let key = s.key("web", json!({}))["key"].as_str().unwrap().to_string();
    let post = |body: Value| match ureq::post(&s.url("/v1/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body)
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    };
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    std::thread::scope(|scope| {
        let decode = scope
            .spawn(|| post(json!({"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": true})));
        // The decode is under way (the model predicts from the calibration on).
        let real = || lines().iter().filter(|s| s["calibration"] == false).count();
        assert!(
            wait_until(Duration::from_secs(60), || real() >= 8),
            "the decode did not start"
        );
        let prompt: Vec<u32> = (0..1200).map(|i| 5 + (i % 40)).collect();
        let (st, v) = post(json!({"prompt": prompt, "max_tokens": 1}));
        assert_eq!(st, 200, "{v}");
        let (st, v) = decode.join().unwrap();
        assert_eq!(st, 200, "{v}");
    });
    let steps = lines();
    (steps, s)
}

/// Steps that held both a decode and prompt tokens, once the model was predicting (after its
/// start-up calibration, whose steps are marked).
fn mixed(steps: &[Value]) -> Vec<u64> {
    assert!(
        steps.iter().any(|s| s["calibration"] == true),
        "not calibrated"
    );
    steps
        .iter()
        .filter(|s| s["calibration"] == false && !s["predicted"].is_null())
        .filter(|s| s["decode_seqs"].as_u64().unwrap() >= 1)
        .map(|s| s["prefill_tokens"].as_u64().unwrap())
        .filter(|&p| p > 0)
        .collect()
}

#[test]
fn a_long_prompt_is_prefilled_in_pieces_that_keep_decodes_on_time() {
    let (capped, _) = steps_with_a_long_prompt_during_a_decode(Target::Flag("0.0001"));
    let pieces = mixed(&capped);
    // 1,200 prompt tokens in pieces of at most the floor, beside the decode.
    assert!(pieces.len() >= 1200 / 16 - 2, "{pieces:?}");
    assert!(pieces.iter().all(|&p| p <= 16), "{pieces:?}");
    for s in &capped {
        assert!(s["seconds"].as_f64().unwrap() > 0.0, "{s}");
    }

    // Without the cap, the same prompt rides along in --max-batch-tokens chunks.
    let (uncapped, _) = steps_with_a_long_prompt_during_a_decode(Target::Flag("0"));
    let pieces = mixed(&uncapped);
    assert!(pieces.iter().any(|&p| p > 200), "{pieces:?}");
}

/// A tenant's `slo` (the numbers `cheapest-within-slo` routes by) sets its targets in the
/// engine: with no default target, its decodes still cap the steps, and its first tokens
/// count against its own TTFT target.
#[test]
fn a_tenants_slo_sets_its_latency_targets() {
    let (steps, s) = steps_with_a_long_prompt_during_a_decode(Target::TenantSlo("0.0001"));
    let pieces = mixed(&steps);
    assert!(pieces.len() >= 1200 / 16 - 2, "{pieces:?}");
    assert!(pieces.iter().all(|&p| p <= 16), "{pieces:?}");
    let text = s.metrics_text();
    let ttft = text
        .lines()
        .find(|l| l.starts_with("serrano:slo_violations_total") && l.contains("kind=\"ttft\""));
    assert!(ttft.is_some(), "{text}");
}

/// A tenant's class comes from the routing config; a request may defer itself to `batch`, and
/// only an admin key or a key granted it may ask `interactive` for a batch tenant. The engine counts interactive
/// tokens that miss their targets.
#[test]
fn latency_classes_come_from_the_tenant_and_the_header() {
    let s = Server::random_with_config(
        serrano_engine::testing::TinyModel::default(),
        &format!("{LOCAL}\n[tenant.acme]\nclass = \"batch\"\n"),
        &["--itl-target-ms", "0.0001"],
    );
    let [acme, web] = tenant_keys(&s, ["acme", "web"]);
    let granted = s.key("acme", json!({"grant_interactive": true}));
    assert_eq!(granted["grant_interactive"], true, "{granted}");
    let granted = granted["key"].as_str().unwrap().to_string();
    let ask = |key: &str, class| complete(&s, key, class, json!({"prompt": "hi", "max_tokens": 4}));
    assert_eq!(ask(&acme, None), 200);
    assert_eq!(ask(&acme, Some("batch")), 200);
    assert_eq!(ask(&acme, Some("interactive")), 403);
    assert_eq!(ask(&granted, Some("interactive")), 200);
    assert_eq!(ask(&web, Some("batch")), 200);
    assert_eq!(ask(&web, Some("interactive")), 200);
    assert_eq!(ask(&web, Some("urgent")), 400);
    // An admin key may lift a batch tenant's request.
    let r = common::authed_post(&s.url("/v1/completions"))
        .set("x-serrano-tenant", "acme")
        .set("x-serrano-slo-class", "interactive")
        .send_json(json!({"prompt": "hi", "max_tokens": 4}));
    assert_eq!(r.map(|r| r.status()).unwrap_or(0), 200);
    // Every interactive gap missed a target of 0.1 µs; batch ones are not counted.
    let text = s.metrics_text();
    assert!(
        common::metric(&text, "serrano:slo_violations_total") > 0.0,
        "{text}"
    );
    assert!(!text.contains("class=\"batch\""), "{text}");
}

/// Creates each tenant and a key of its own; returns the keys' secrets in order.
fn tenant_keys<const N: usize>(s: &Server, tenants: [&str; N]) -> [String; N] {
    tenants.map(|t| {
        s.tenant(t);
        s.key(t, json!({}))["key"].as_str().unwrap().to_string()
    })
}

/// POSTs a completion `body` with `key` (and the request's latency class header, if any);
/// returns the status.
fn complete(s: &Server, key: &str, class: Option<&str>, body: Value) -> u16 {
    let mut r =
        ureq::post(&s.url("/v1/completions")).set("Authorization", &format!("Bearer {key}"));
    if let Some(c) = class {
        r = r.set("x-serrano-slo-class", c);
    }
    match r.send_json(body) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

/// The step log lines of `log` (JSON).
fn step_lines(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

/// Once an interactive request has arrived, batch prompts advance in steps no longer than an
/// interactive decode is allowed (a request arriving mid-step waits for its end): with a target
/// no step can meet, the floor, 16 prompt tokens. Before one arrives, batch prompts take whole
/// `--max-batch-tokens` chunks. The scheduler's arithmetic, from the step log: the steps are
/// told apart by what they hold, not by wall-clock margins (a 16-token step of this model takes
/// about a millisecond, so the batch prompt's tail may end within a few milliseconds of the
/// interactive answer).
#[test]
fn batch_prompts_take_short_steps_once_an_interactive_request_arrives() {
    const CHUNK: u64 = 128;
    const INTERACTIVE: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps.jsonl");
    let log_arg = log.to_string_lossy().to_string();
    let chunk_arg = CHUNK.to_string();
    let s = Server::random_with_config(
        common::slow_model(),
        &format!("{LOCAL}\n[tenant.evals]\nclass = \"batch\"\n"),
        &[
            "--step-log",
            &log_arg,
            "--no-prefix-caching",
            "--max-batch-tokens",
            &chunk_arg,
            "--itl-target-ms",
            "0.0001",
        ],
    );
    let [evals, web] = tenant_keys(&s, ["evals", "web"]);
    let post = |key: &str, body: Value| assert_eq!(complete(&s, key, None, body), 200);
    let prompt = |n: u64, salt: u64| (0..n).map(|i| 5 + (i * 7 + salt) % 40).collect::<Vec<_>>();
    std::thread::scope(|scope| {
        // 2,000 tokens: ~16 whole chunks, most of them still to come when the interactive
        // request arrives two chunks in.
        let batch =
            scope.spawn(|| post(&evals, json!({"prompt": prompt(2000, 1), "max_tokens": 1})));
        let real = || {
            step_lines(&log)
                .iter()
                .filter(|s| s["calibration"] == false)
                .count()
        };
        assert!(
            wait_until(Duration::from_secs(60), || real() >= 2),
            "the batch prompt did not start"
        );
        post(
            &web,
            json!({"prompt": prompt(INTERACTIVE, 2), "max_tokens": 1}),
        );
        batch.join().unwrap();
        let steps = step_lines(&log);
        let prefill: Vec<u64> = steps
            .iter()
            .filter(|s| s["calibration"] == false)
            .map(|s| s["prefill_tokens"].as_u64().unwrap())
            .collect();
        // Whole chunks until the interactive prompt's step (the first that is not one), which
        // holds that prompt and at most the floor of the batch prompt; the floor after it.
        let switch = prefill
            .iter()
            .position(|&p| p != CHUNK)
            .unwrap_or(prefill.len());
        assert!(switch >= 2, "{prefill:?}");
        assert!(
            (INTERACTIVE..=INTERACTIVE + 16).contains(&prefill[switch]),
            "{prefill:?}"
        );
        let after = &prefill[switch + 1..];
        assert!(!after.is_empty(), "{prefill:?}");
        assert!(after.iter().all(|&p| p <= 16), "{prefill:?}");
        assert_eq!(prefill.iter().sum::<u64>(), 2000 + INTERACTIVE);
    });
}

/// The real default model under a batch tenant flooding the server far past its sequence slots:
/// an interactive tenant's requests still get their first token within their 2 s target (they
/// are admitted ahead of batch prompts, take a batch sequence's slot, and the batch steps around
/// them are short). A bound on wall time: 5-10x what the scheduler needs on 2 vCPUs.
#[test]
fn a_batch_flood_keeps_interactive_first_tokens_within_target() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routing.toml");
    std::fs::write(
        &config,
        format!("{LOCAL}\n[tenant.evals]\nclass = \"batch\"\n"),
    )
    .unwrap();
    let config_arg = config.to_string_lossy().to_string();
    let s = Server::start(
        &common::real_model(),
        &[
            "--config",
            &config_arg,
            "--no-prefix-caching",
            "--max-num-seqs",
            "8",
        ],
    );
    let [evals, web] = tenant_keys(&s, ["evals", "web"]);
    let post = |key: &str, body: Value| complete(&s, key, None, body);
    let prompt = |n: u32, salt: u32| {
        (0..n)
            .map(|i| 100 + (i * 31 + salt) % 5000)
            .collect::<Vec<_>>()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::sync::atomic::AtomicUsize::new(0);
    let mut latencies = Vec::new();
    std::thread::scope(|scope| {
        // 24 clients of the batch tenant, three times the slots: batch prompts always wait.
        for c in 0..24 {
            let (stop, served, evals, post) = (&stop, &served, &evals, &post);
            scope.spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = json!({"prompt": prompt(400, c * 1000 + i), "max_tokens": 32,
                                      "ignore_eos": true});
                    if post(evals, body) == 200 {
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_secs(5));
        for i in 0..10 {
            let started = std::time::Instant::now();
            let st = post(&web, json!({"prompt": prompt(100, 7 + i), "max_tokens": 1}));
            assert_eq!(st, 200);
            latencies.push(started.elapsed());
            std::thread::sleep(Duration::from_millis(700));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    eprintln!("interactive first tokens beside the flood: {latencies:?}");
    assert!(served.into_inner() > 0, "the flood was not served");
    let worst = latencies.iter().max().copied().unwrap_or_default();
    assert!(worst <= Duration::from_secs(2), "{latencies:?}");
}
