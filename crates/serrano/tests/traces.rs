//! Traces over OTLP to a real receiver (the OpenTelemetry project's protocol definitions and
//! gRPC's Python server, `otlp_receiver.py`), over HTTP/protobuf and gRPC: one span per request
//! with GenAI and serrano attributes, children for the pipeline's steps and the engine's
//! queue, prefill and decode (with an event per token when asked), the client's
//! `traceparent` honoured, and the trace carried on to an upstream serrano and to an MCP server
//! of the official SDK (whose own spans join it).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_until, Server};
use serde_json::{json, Value};

/// The receiver, its two ports and its output; killed on drop.
struct Receiver {
    child: Child,
    grpc: u16,
    http: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start() -> Receiver {
        // Once for all tests (two installing one venv at once would break it).
        static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let py = PYTHON.get_or_init(|| {
            common::python_venv(
                "otelenv",
                &[
                    "opentelemetry-proto==1.45.2",
                    "grpcio==1.85.4",
                    "protobuf==7.36.2",
                ],
                "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py");
        let mut child = Command::new(py)
            .arg(script)
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = |name: &str| -> u16 {
            line.split_whitespace()
                .find_map(|p| p.strip_prefix(&format!("{name}=")))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("receiver said {line:?}"))
        };
        Receiver {
            grpc: port("grpc"),
            http: port("http"),
            child,
            out,
            _dir: dir,
        }
    }

    /// The spans of `trace_id` received so far.
    fn spans(&self, trace_id: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|s| s["trace_id"] == trace_id)
            .collect()
    }

    /// Waits (the exporter sends every 5 s) until `trace_id` has a span named `name`.
    fn wait_for(&self, trace_id: &str, name: &str) -> Vec<Value> {
        assert!(
            wait_until(Duration::from_secs(30), || self
                .spans(trace_id)
                .iter()
                .any(|s| s["name"] == name)),
            "no span {name:?} in trace {trace_id}: {:?}",
            self.spans(trace_id)
        );
        self.spans(trace_id)
    }
}

fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {spans:?}"))
}

/// A completion sent with a `traceparent` naming `trace_id` and parent span `parent`.
fn complete(s: &Server, trace_id: &str, parent: &str) {
    let r = common::authed_post(&s.url("/v1/completions"))
        .set("traceparent", &format!("00-{trace_id}-{parent}-01"))
        .send_json(json!({"prompt": "hello", "max_tokens": 4, "ignore_eos": true}))
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The request span and its children, over each protocol.
#[test]
fn a_request_is_a_trace_with_genai_attributes_over_http_and_grpc() {
    let rx = Receiver::start();
    for (protocol, port, trace_id) in [
        ("http", rx.http, "0af7651916cd43dd8448eb211c80319c"),
        ("grpc", rx.grpc, "4bf92f3577b34da6a3ce929d0e0e4736"),
    ] {
        let endpoint = format!("http://127.0.0.1:{port}");
        let s = Server::tiny(&["--otlp-endpoint", &endpoint, "--otlp-protocol", protocol]);
        complete(&s, trace_id, "b7ad6b7169203331");
        let spans = rx.wait_for(trace_id, "POST /v1/completions");
        let root = named(&spans, "POST /v1/completions");
        assert_eq!(root["transport"], protocol);
        assert_eq!(root["service"], "serrano");
        assert_eq!(root["parent_span_id"], "b7ad6b7169203331", "{root}");
        assert_eq!(root["kind"], 2, "a server span: {root}");
        let a = &root["attributes"];
        assert_eq!(a["gen_ai.operation.name"], "text_completion", "{root}");
        assert_eq!(a["gen_ai.request.model"], "tiny", "{root}");
        assert_eq!(a["gen_ai.request.max_tokens"], "4", "{root}");
        assert_eq!(a["gen_ai.usage.output_tokens"], "4", "{root}");
        assert_eq!(a["gen_ai.response.finish_reasons"], "length", "{root}");
        assert_eq!(a["http.response.status_code"], "200", "{root}");
        assert_eq!(a["serrano.tenant"], "admin", "{root}");
        assert_eq!(a["serrano.backend"], "local", "{root}");
        assert_eq!(a["serrano.slo_class"], "interactive", "{root}");
        assert!(a["serrano.audit.seq"].as_str().is_some(), "{root}");
        assert!(a["serrano.key_prefix"].as_str().is_some(), "{root}");
        // The pipeline's steps and the attempt at the backend are its children.
        let spans = rx.wait_for(trace_id, "text_completion tiny");
        for step in [
            "plan",
            "filters",
            "reserve",
            "text_completion tiny",
            "finish",
        ] {
            assert_eq!(
                named(&spans, step)["parent_span_id"],
                root["span_id"],
                "{step}: {spans:?}"
            );
        }
        let attempt = named(&spans, "text_completion tiny");
        assert_eq!(attempt["kind"], 3, "a client span");
        // The engine's phases, children of the attempt, one after another within the request.
        let spans = rx.wait_for(trace_id, "decode");
        let time = |s: &Value, k: &str| s[k].as_u64().unwrap();
        let mut last = time(root, "start_ns");
        for phase in ["queue", "prefill", "decode"] {
            let p = named(&spans, phase);
            assert_eq!(p["parent_span_id"], attempt["span_id"], "{phase}: {p}");
            assert!(
                time(p, "start_ns") >= last,
                "{phase} starts early: {spans:?}"
            );
            assert!(time(p, "end_ns") >= time(p, "start_ns"), "{p}");
            last = time(p, "end_ns");
        }
        assert!(last <= time(root, "end_ns"), "{spans:?}");
        let decode = named(&spans, "decode");
        assert_eq!(decode["attributes"]["gen_ai.usage.output_tokens"], "4");
        let steps = &named(&spans, "prefill")["attributes"]["serrano.prefill_steps"];
        assert_eq!(steps, "1", "{spans:?}");
        // Only the span's own attributes, not the source line or thread.
        assert!(root["attributes"].get("code.file.path").is_none(), "{root}");
    }
}

/// With `x-serrano-trace-tokens: true`, the decode span has an event per token, at its time,
/// naming the engine step it came from and what that step held; without it, none.
#[test]
fn a_request_may_ask_for_an_event_per_token() {
    let rx = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", rx.http);
    let s = Server::tiny(&["--otlp-endpoint", &endpoint]);
    let (with, without) = (
        "5b8efff798038103d269b633813fc60c",
        "6e0c63257de34c92bf9efcd03927272e",
    );
    for (trace_id, asked) in [(with, "true"), (without, "false")] {
        let r = common::authed_post(&s.url("/v1/completions"))
            .set("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01"))
            .set("x-serrano-trace-tokens", asked)
            .send_json(json!({"prompt": "hello there", "max_tokens": 6, "ignore_eos": true}))
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let spans = rx.wait_for(with, "decode");
    let decode = named(&spans, "decode");
    let events = decode["events"].as_array().unwrap();
    assert_eq!(events.len(), 6, "{decode}");
    let num = |e: &Value, k: &str| e["attributes"][k].as_str().unwrap().parse::<f64>().unwrap();
    let (start, end) = (
        decode["start_ns"].as_u64().unwrap(),
        decode["end_ns"].as_u64().unwrap(),
    );
    let mut last_step = 0.0;
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e["name"], "serrano.token");
        assert_eq!(num(e, "serrano.token.index"), n as f64);
        let t = e["time_ns"].as_u64().unwrap();
        assert!(start <= t && t <= end, "{e} outside {start}..{end}");
        // One token per step for one sequence: each from a later step than the last.
        assert!(num(e, "serrano.step") > last_step, "{events:?}");
        last_step = num(e, "serrano.step");
        assert_eq!(num(e, "serrano.step.seqs"), 1.0, "{e}");
        assert!(num(e, "serrano.step.ms") >= 0.0 && num(e, "serrano.token.gap_ms") >= 0.0);
    }
    // The first token comes from the step that computed the prompt; the rest from decodes.
    assert!(
        num(&events[0], "serrano.step.prefill_tokens") >= 2.0,
        "{}",
        events[0]
    );
    assert_eq!(num(&events[0], "serrano.step.decode_seqs"), 0.0);
    assert_eq!(num(&events[1], "serrano.step.prefill_tokens"), 0.0);
    assert_eq!(num(&events[1], "serrano.step.decode_seqs"), 1.0);
    let spans = rx.wait_for(without, "decode");
    assert_eq!(named(&spans, "decode")["events"], json!([]));
    // Anything but true or false is refused, naming the header.
    let r = common::authed_post(&s.url("/v1/completions"))
        .set("x-serrano-trace-tokens", "yes")
        .send_json(json!({"prompt": "hello", "max_tokens": 1}));
    let Err(ureq::Error::Status(400, r)) = r else {
        panic!("{r:?}")
    };
    assert!(r.into_string().unwrap().contains("x-serrano-trace-tokens"));
}

/// A gateway passes the trace on: the upstream serrano's request span is a child of the
/// gateway's attempt span, in the same trace.
#[test]
fn a_gateway_carries_the_trace_to_its_upstream() {
    let rx = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", rx.http);
    let upstream = Server::tiny(&["--otlp-endpoint", &endpoint, "--allow-anonymous"]);
    let gateway = Server::gateway(
        &format!("{}/v1", upstream.base),
        &["--otlp-endpoint", &endpoint],
    );
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let r = common::authed_post(&gateway.url("/v1/completions"))
        .set("traceparent", &format!("00-{trace_id}-eee19b7ec3c1b174-01"))
        .send_json(json!({"model": "tiny", "prompt": "hello", "max_tokens": 2}))
        .unwrap();
    assert_eq!(r.status(), 200);
    // The gateway's attempt at its upstream (the upstream's own attempt, at its engine, is
    // in the trace too).
    let attempt = || {
        rx.spans(trace_id).into_iter().find(|s| {
            s["name"] == "text_completion tiny" && s["attributes"]["serrano.backend"] == "upstream"
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || attempt().is_some()),
        "{:?}",
        rx.spans(trace_id)
    );
    let attempt = attempt().unwrap();
    let upstream_span = || {
        rx.spans(trace_id).into_iter().any(|s| {
            s["name"] == "POST /v1/completions"
                && s["parent_span_id"] == attempt["span_id"]
                && s["attributes"]["serrano.backend"] == "local"
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), upstream_span),
        "the upstream's span is not the attempt's child: {:?}",
        rx.spans(trace_id)
    );
}

/// An MCP server of the official Python SDK exporting its own spans to the receiver, killed on
/// drop.
struct McpServer(Child);

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Server-side tool use on the default model: the gate, each step and each tool call are
/// children of the request's span; the call's `tools/call` client span carries the trace to
/// the MCP server in `_meta`, and the server's own span is its child.
#[test]
fn tool_use_steps_and_mcp_calls_are_in_the_trace_and_reach_the_mcp_server() {
    let rx = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", rx.http);
    let py = common::python_venv(
        "mcpotelenv",
        &[
            "mcp==2.3.0",
            "opentelemetry-sdk==1.45.2",
            "opentelemetry-exporter-otlp-proto-http==1.45.2",
        ],
        "import mcp.server.mcpserver, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http",
    );
    let port = common::free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_server.py");
    let _mcp = McpServer(
        Command::new(py)
            .arg(script)
            .args(["calc", &port.to_string()])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routing.toml");
    let text = format!(
        "[[backend]]\nname = \"local\"\nkind = \"local\"\nregion = \"eu\"\ntier = \"cpu\"\n\n\
         [[mcp_server]]\nname = \"calc\"\nurl = \"http://127.0.0.1:{port}/mcp\"\nregion = \"eu\"\n"
    );
    std::fs::write(&config, text).unwrap();
    let s = Server::start(
        &common::real_model(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-tool-steps",
            "1",
            "--otlp-endpoint",
            &endpoint,
        ],
    );
    let trace_id = "8a3c60f7d188f8fa79d48a391a778fa6";
    let r = common::authed_post(&s.url("/v1/chat/completions"))
        .set("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send_json(json!({
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "tools": [{"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]}],
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"},
            "max_tokens": 48,
            "temperature": 0,
        }))
        .unwrap();
    assert_eq!(r.status(), 200);
    let spans = rx.wait_for(trace_id, "POST /v1/chat/completions");
    let root = named(&spans, "POST /v1/chat/completions");
    for child in [
        "gate",
        "tool use step 0",
        "tool use step 1",
        "tool call calc__add",
    ] {
        assert_eq!(
            named(&spans, child)["parent_span_id"],
            root["span_id"],
            "{child}: {spans:?}"
        );
    }
    // Each step is a request of its own: its pipeline's steps are its children.
    let step0 = named(&spans, "tool use step 0");
    assert_eq!(
        step0["attributes"]["gen_ai.response.finish_reasons"],
        "tool_calls"
    );
    let steps: Vec<&Value> = spans
        .iter()
        .filter(|s| s["parent_span_id"] == step0["span_id"])
        .collect();
    assert!(steps.iter().any(|s| s["name"] == "reserve"), "{steps:?}");
    // The call through the gateway, and the MCP server's own span beneath it.
    let call = named(&spans, "tool call calc__add");
    let spans = rx.wait_for(trace_id, "tools/call add");
    let ours = spans
        .iter()
        .find(|s| s["name"] == "tools/call add" && s["service"] == "serrano")
        .unwrap_or_else(|| panic!("{spans:?}"));
    assert_eq!(ours["parent_span_id"], call["span_id"], "{ours}");
    assert_eq!(ours["kind"], 3, "a client span: {ours}");
    assert_eq!(ours["attributes"]["mcp.method.name"], "tools/call");
    assert_eq!(ours["attributes"]["gen_ai.tool.name"], "add");
    assert_eq!(ours["attributes"]["serrano.mcp.server"], "calc");
    assert!(
        wait_until(Duration::from_secs(30), || rx
            .spans(trace_id)
            .iter()
            .any(|s| s["service"] == "mcp-calc")),
        "the MCP server's span did not join the trace: {:?}",
        rx.spans(trace_id)
    );
    let spans = rx.spans(trace_id);
    let theirs = spans.iter().find(|s| s["service"] == "mcp-calc").unwrap();
    assert_eq!(theirs["name"], "tools/call add", "{theirs}");
    assert_eq!(theirs["parent_span_id"], ours["span_id"], "{theirs}");
    assert_eq!(theirs["kind"], 2, "a server span: {theirs}");
}
