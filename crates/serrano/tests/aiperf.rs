//! `serrano bench` cross-checked with an independent load generator from PyPI (NVIDIA's aiperf)
//! on the same server and the same prompts: mean TTFT and output throughput within 10%.
//! aiperf is installed into a virtualenv under target/ on first use (CI's .ci/run does it first).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{real_model, Server, ADMIN_KEY};
use serde_json::Value;

/// Pinned: the JSON field names below are aiperf 0.13's.
const AIPERF: &[&str] = &["aiperf==0.13.0", "gguf==0.19.0"];

/// The workload both tools run: a closed loop of 2 clients over 12 measured requests of a
/// 128-token prompt (chat template added by the server) and exactly 32 output tokens.
const CONCURRENCY: &str = "2";
const REQUESTS: &str = "12";
const WARMUP: &str = "2";

/// Runs `cmd` to completion within `limit`, its output captured to `log`; kills it past the limit.
fn run_bounded(mut cmd: Command, limit: Duration, log: &Path) -> bool {
    let out = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} ran past {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pins every thread of process `pid` to core 1 (where there are two cores and `taskset`).
fn pin(pid: &str) -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
        && Command::new("taskset")
            .args(["-a", "-p", "-c", "1", pid])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// `program`, on core 0 when the server is pinned to core 1.
fn client(pinned: bool, program: &Path) -> Command {
    if !pinned {
        return Command::new(program);
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(program);
    cmd
}

fn within(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance * b
}

#[test]
fn serrano_bench_agrees_with_aiperf_on_ttft_and_throughput() {
    let py = common::python_venv("aiperf-venv", AIPERF, "import aiperf, gguf");
    let aiperf_bin = py.with_file_name("aiperf");
    let model = real_model();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| -> PathBuf { dir.path().join(name) };

    // aiperf insists on a Hugging Face tokenizer even when it counts tokens from the server's
    // usage; this writes one from the GGUF's own vocabulary, offline.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf_tokenizer.py");
    let mut tok = Command::new(&py);
    tok.arg(script).arg(&model).arg(path("tokenizer"));
    assert!(
        run_bounded(tok, Duration::from_secs(120), &path("tok.log")),
        "{}",
        std::fs::read_to_string(path("tok.log")).unwrap()
    );

    // Prefix caching off: both tools send the same prompts, and the second must not find the
    // first's KV blocks cached. The server gets core 1 and one kernel thread, the clients core
    // 0: aiperf is several Python processes, and unpinned the server measured 10-15% faster
    // beside them than beside the idle `serrano bench` (the busy clients kept the VM's second
    // core awake), a difference of the server, not of the tools.
    let s = Server::start(&model, &["--threads", "1", "--no-prefix-caching"]);
    let pinned = pin(&s.pid().to_string());

    let mut bench = client(pinned, Path::new(env!("CARGO_BIN_EXE_serrano")));
    bench
        .arg("bench")
        .args(["--url", &format!("{}/v1", s.base), "--endpoint", "chat"])
        .args(["--concurrency", CONCURRENCY, "--requests", REQUESTS])
        .args(["--warmup", WARMUP])
        .args(["--prompt-tokens", "128", "--output-tokens", "32", "--quiet"])
        .arg("--save-prompts")
        .arg(path("prompts.jsonl"))
        .arg("--json")
        .arg(path("serrano.json"))
        .env("SERRANO_API_KEY", ADMIN_KEY);
    assert!(
        run_bounded(bench, Duration::from_secs(300), &path("bench.log")),
        "{}",
        std::fs::read_to_string(path("bench.log")).unwrap()
    );
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(path("serrano.json")).unwrap()).unwrap();
    assert_eq!(ours["completed"], 12, "{ours}");

    let mut aiperf = client(pinned, &aiperf_bin);
    aiperf
        .args(["profile", "--model", ours["model_id"].as_str().unwrap()])
        .args(["--url", &s.base, "--api-key", ADMIN_KEY])
        .args(["--endpoint-type", "chat", "--streaming"])
        .arg("--tokenizer")
        .arg(path("tokenizer"))
        .args(["--custom-dataset-type", "single_turn", "--input-file"])
        .arg(path("prompts.jsonl"))
        .args(["--concurrency", CONCURRENCY, "--request-count", REQUESTS])
        .args(["--warmup-request-count", WARMUP])
        .args(["--use-server-token-count", "--ui-type", "none"])
        .args([
            "--extra-inputs",
            "ignore_eos:true",
            "--extra-inputs",
            "temperature:0",
        ])
        .arg("--output-artifact-dir")
        .arg(path("aiperf"));
    let ok = run_bounded(aiperf, Duration::from_secs(300), &path("aiperf.log"));
    let log = std::fs::read_to_string(path("aiperf.log")).unwrap();
    assert!(ok, "{log}");
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(path("aiperf/profile_export_aiperf.json")).unwrap(),
    )
    .unwrap();
    let avg = |name: &str| theirs[name]["avg"].as_f64().unwrap_or(f64::NAN);

    let ttft = ours["mean_ttft_ms"].as_f64().unwrap();
    let throughput = ours["output_throughput"].as_f64().unwrap();
    println!("{log}");
    println!(
        "TTFT mean ms: serrano bench {ttft:.1}, aiperf {:.1}; output tokens/s: {throughput:.2}, {:.2}",
        avg("time_to_first_token"),
        avg("output_token_throughput")
    );
    // The same requests reached the server: counts from the server's own usage.
    assert_eq!(avg("request_count"), 12.0, "{theirs}");
    assert_eq!(avg("output_sequence_length"), 32.0);
    let ours_input = ours["total_input_tokens"].as_f64().unwrap() / 12.0;
    assert_eq!(avg("input_sequence_length"), ours_input);
    assert!(within(avg("time_to_first_token"), ttft, 0.10), "TTFT");
    assert!(
        within(avg("output_token_throughput"), throughput, 0.10),
        "throughput"
    );
}
