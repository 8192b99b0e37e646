//! The governed MCP gateway at `/mcp`, end to end with the official Python SDK (`mcp`) on both
//! sides: real MCP servers (two over Streamable HTTP, one over stdio) behind serrano, and the
//! SDK's client in front of it. Checks per-tenant tool lists, allow/deny lists, residency, the
//! tenant's filters on arguments and results, the result size limit, rate limits, the key, and
//! that every call is on the tamper-evident audit log. The SDK goes into a virtualenv under
//! target/ on first use.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, real_model, wait_until, Server};
use serde_json::{json, Value};
use serrano_engine::testing::TinyModel;

/// The SDK's major version changes its API (v2 renamed FastMCP); pinned.
const MCP_PACKAGE: &str = "mcp==2.3.0";
const TOKEN: &str = "mcp-test-token";

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// An MCP server process, killed when dropped.
struct McpServer(Child);

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mcp_server.py NAME PORT [TOKEN]` and waits until it listens.
fn http_server(py: &PathBuf, name: &str, token: Option<&str>) -> (McpServer, String) {
    let port = free_port();
    let mut cmd = Command::new(py);
    cmd.arg(script("mcp_server.py"))
        .arg(name)
        .arg(port.to_string())
        .stdout(Stdio::null());
    if let Some(t) = token {
        cmd.arg(t);
    }
    let child = McpServer(cmd.spawn().unwrap());
    let up = wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "the MCP server {name} did not start");
    (child, format!("http://127.0.0.1:{port}/mcp"))
}

#[test]
fn mcp_gateway_governs_tool_calls_through_the_official_sdk() {
    let py = common::python_venv("mcpenv", &[MCP_PACKAGE], "import mcp.server.mcpserver");
    let (_eu, eu_url) = http_server(&py, "tools_eu", Some(TOKEN));
    let (_us, us_url) = http_server(&py, "tools_us", None);
    let config = format!(
        r#"
[[mcp_server]]
name = "tools_eu"
url = "{eu_url}"
region = "eu"
api_key_env = "SERRANO_TEST_MCP_TOKEN"
deny_tools = ["secret"]

[[mcp_server]]
name = "tools_us"
url = "{us_url}"
region = "us"

[[mcp_server]]
name = "local"
command = ["{py}", "{server}", "local", "stdio"]
region = "eu"
tenants = ["acme"]

[tenant.acme]
regions = ["eu"]
"#,
        py = py.display(),
        server = script("mcp_server.py"),
    );
    std::env::set_var("SERRANO_TEST_MCP_TOKEN", TOKEN);
    let s = Server::random_with_config(TinyModel::default(), &config, &[]);
    s.tenant("acme");
    s.tenant("beta");
    let policy = |t: &str, p: Value| {
        let (st, v) = s.post(&format!("/admin/v1/tenants/{t}/policy"), &p);
        assert_eq!(st, 200, "{v}");
    };
    policy("acme", json!({"pii": "redact", "pii_on_output": true}));
    policy("beta", json!({"allowed_tools": ["tools_eu__add"]}));
    let acme = s.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, v) = s.post("/admin/v1/limits", &json!({"tenant": "beta", "rpm": 4}));
    assert_eq!(st, 200, "{v}");
    let beta = s.key("beta", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();

    s.tenant("gamma");
    let (st, v) = s.post(
        "/admin/v1/budgets",
        &json!({"tenant": "gamma", "unit": "tokens", "period": "total", "limit": 3}),
    );
    assert_eq!(st, 200, "{v}");
    let gamma = s.key("gamma", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    s.tenant("delta");
    let (st, v) = s.post(
        "/admin/v1/limits",
        &json!({"tenant": "delta", "tool_calls_per_day": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let delta = s.key("delta", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();

    let out = Command::new(&py)
        .arg(script("mcp_client.py"))
        .arg(&s.base)
        .arg(&acme)
        .arg(&beta)
        .arg(&gamma)
        .arg(&delta)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l == "16 passed, 0 failed"),
        "{stdout}"
    );

    // Without a valid key, nothing reaches an MCP server: a 401 from the gate.
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let (st, v, _) = s.post_as("sk-not-a-key", "/mcp", list.to_string().as_bytes());
    assert_eq!(st, 401, "{v}");
    // The body is read within the server's limits before the SDK parses it.
    assert_eq!(oversized_post_status(&s, &acme, "/mcp", 5 << 20), 413);

    // Every call is on the audit log: its tool, its arguments' sha256, the server as the
    // model and route, and what came of it; the chain verifies.
    let (_, log) = s.get("/admin/v1/audit?limit=1000");
    let calls: Vec<&Value> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["endpoint"] == "/mcp" && !r["tool_calls"].as_array().unwrap().is_empty())
        .collect();
    let find = |tool: &str| {
        calls
            .iter()
            .find(|r| r["tool_calls"][0] == tool)
            .unwrap_or_else(|| panic!("no audit record of {tool}: {log}"))
    };
    let add = find("tools_eu__add");
    assert_eq!(add["model"], "mcp:tools_eu", "{add}");
    assert_eq!(add["tenant"], "acme", "{add}");
    assert_eq!(add["finish_reason"], "tool_result", "{add}");
    assert_eq!(
        add["tool_args_sha256"][0],
        sha256_hex(r#"{"a":2,"b":3}"#),
        "{add}"
    );
    assert_eq!(find("local__add")["model"], "mcp:local");
    assert_eq!(
        find("tools_eu__big")["finish_reason"],
        "tool_result_too_large"
    );
    let redacted = find("tools_eu__contact");
    assert!(
        !redacted["filters"].as_array().unwrap().is_empty(),
        "{redacted}"
    );
    assert_eq!(find("tools_eu__secret")["finish_reason"], "tool_refused");
    let limited = |tenant: &str| {
        calls
            .iter()
            .filter(|r| r["tenant"] == tenant && r["finish_reason"] == "rate_limited")
            .count()
    };
    assert_eq!(limited("beta"), 2, "{log}");
    assert_eq!(limited("delta"), 2, "{log}");
    let over = calls
        .iter()
        .filter(|r| r["finish_reason"] == "over_budget")
        .count();
    assert_eq!(over, 2, "{log}");
    // What a call is charged: one token, only for calls made.
    let (_, usage) = s.get("/admin/v1/usage?group_by=tenant");
    let gamma_usage = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"] == "gamma")
        .cloned()
        .unwrap_or_default();
    assert_eq!(gamma_usage["prompt_tokens"], 3, "{usage}");
    assert_eq!(gamma_usage["completion_tokens"], 0, "{usage}");
    // A call the gateway refused before making it names no backend.
    assert!(find("tools_us__add")["backend"].is_null());
    assert_eq!(s.get("/admin/v1/audit/verify").1["ok"], true);
}

/// Server-side tool use with the default model: a chat request offering an MCP server's tools
/// (`{"type": "mcp"}`) with a tool choice that names one runs the model, the call through the
/// gateway, and the model again on the result, which answers in words; every step and the call
/// are audited requests of their own, each charged, and the chain verifies.
#[test]
fn a_server_side_tool_loop_runs_mcp_calls_for_the_default_model() {
    let py = common::python_venv("mcpenv", &[MCP_PACKAGE], "import mcp.server.mcpserver");
    let (_calc, calc_url) = http_server(&py, "calc", None);
    let (_far, far_url) = http_server(&py, "far", None);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routing.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[backend]]
name = "local"
kind = "local"
region = "eu"
tier = "cpu"

[[mcp_server]]
name = "calc"
url = "{calc_url}"
region = "eu"

[[mcp_server]]
name = "far"
url = "{far_url}"
region = "us"

[tenant.acme]
regions = ["eu"]
"#
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().to_string();
    let s = Server::start(
        &real_model(),
        &["--config", &config, "--max-tool-steps", "1"],
    );
    s.tenant("acme");
    let key = s.key("acme", json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    let ask = |body: Value| s.post_as(&key, "/v1/chat/completions", body.to_string().as_bytes());

    let (st, v, headers) = ask(json!({
        "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "tools": [{"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]}],
        "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"},
        "max_tokens": 64,
        "temperature": 0,
    }));
    assert_eq!(st, 200, "{v}");
    println!("{v:#}");
    let calls = v["serrano_tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    let call = &calls[0];
    assert_eq!(call["name"], "calc__add", "{v}");
    assert_eq!(call["is_error"], false, "{v}");
    // The arguments are the schema's (the choice was constrained), and the output is what the
    // real MCP server computed from them.
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    let sum = args["a"].as_i64().unwrap() + args["b"].as_i64().unwrap();
    assert_eq!(call["output"], sum.to_string(), "{v}");
    // After the last round of calls the model is offered no tool: it answers in words.
    let message = &v["choices"][0]["message"];
    assert!(message["tool_calls"].is_null(), "{v}");
    assert!(!message["content"].as_str().unwrap().is_empty(), "{v}");
    let usage = &v["usage"];

    // Every step and the call are on the audit log as requests of their own.
    let id = headers.get("x-request-id").unwrap().to_string();
    let (_, log) = s.get("/admin/v1/audit?limit=1000");
    let record = |rid: &str| {
        log["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == rid)
            .cloned()
            .unwrap_or_else(|| panic!("no audit record {rid}: {log}"))
    };
    let first = record(&format!("{id}.step0"));
    assert_eq!(first["finish_reason"], "tool_calls", "{first}");
    assert_eq!(first["tool_calls"][0], "calc__add", "{first}");
    let made = record(&format!("{id}.step0.call0"));
    assert_eq!(made["model"], "mcp:calc", "{made}");
    assert_eq!(made["finish_reason"], "tool_result", "{made}");
    assert_eq!(made["prompt_tokens"], 1, "{made}");
    let last = record(&format!("{id}.step1"));
    assert_eq!(last["status"], 200, "{last}");
    let whole = record(&id);
    assert_eq!(whole["tool_calls"][0], "calc__add", "{whole}");
    assert_eq!(whole["prompt_tokens"], 0, "{whole}");
    // The usage reported is the steps' together; the ledger charged them and the call.
    let steps_prompt =
        first["prompt_tokens"].as_u64().unwrap() + last["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap(),
        steps_prompt,
        "{v}"
    );
    let (_, charged) = s.get("/admin/v1/usage?group_by=tenant");
    let acme = charged["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant"] == "acme")
        .cloned()
        .unwrap();
    assert_eq!(
        acme["prompt_tokens"].as_u64().unwrap(),
        steps_prompt + 1,
        "{charged}"
    );

    // What the loop cannot honour, or the key may not reach, is refused before any step.
    let refused = |tools: Value, param: &str| {
        let (st, v, _) = ask(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "tools": tools,
            "max_tokens": 8,
        }));
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    // Residency: acme is held to eu, and "far" is in us.
    let m = refused(json!([{"type": "mcp", "server_label": "far"}]), "tools");
    assert!(m.contains("no MCP server 'far'"), "{m}");
    refused(
        json!([{"type": "mcp", "server_label": "calc", "server_url": "http://127.0.0.1:1/"}]),
        "tools[0].server_url",
    );
    refused(
        json!([{"type": "mcp", "server_label": "calc", "allowed_tools": ["nope"]}]),
        "tools",
    );
    let (st, v, _) = ask(json!({
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "mcp", "server_label": "calc"}],
        "n": 2,
    }));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "n", "{v}");

    // A client that asks for a stream gets the loop's answer as SSE chunks, usage last: the
    // same answer as the whole one above (temperature 0).
    let events = s.stream(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "tools": [{"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]}],
            "tool_choice": {"type": "mcp", "server_label": "calc", "name": "add"},
            "max_tokens": 64,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, message["content"].as_str().unwrap(), "{events:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"], *usage, "{last}");
    assert_eq!(last["serrano_tool_calls"][0]["is_error"], false, "{last}");
    assert_eq!(s.get("/admin/v1/audit/verify").1["ok"], true);
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Posts `len` bytes to `path` and returns the answer's status, writing the body from another
/// thread while this one reads: the server answers 413 (and closes) as soon as the body passes
/// its limit, and a client that insists on writing the rest first would see a broken pipe
/// rather than the answer.
fn oversized_post_status(s: &Server, key: &str, path: &str, len: usize) -> u16 {
    use std::io::{Read, Write};
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // Write errors are expected once the server has answered and closed.
        if writer.write_all(head.as_bytes()).is_ok() {
            let _ = writer.write_all(&vec![b' '; len]);
        }
    });
    let mut answer = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match conn.read(&mut answer[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    // Unblocks the writer too (the clone shares the socket), whatever the server did.
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let line = String::from_utf8_lossy(&answer[..got]).to_string();
    line.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
}
