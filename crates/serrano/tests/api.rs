//! The OpenAI-compatible API over real HTTP against the real binary, on a tiny random-weight
//! model written by the test (fast; no download).

mod common;

use std::time::Duration;

use common::Server;
use serde_json::{json, Value};

fn assert_openai_error(status: u16, body: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "param and code must be present (null allowed): {body}"
    );
    if let Some(p) = want_param {
        assert_eq!(e["param"], p, "{body}");
    }
}

#[test]
fn health_models_and_unknown_routes() {
    let s = Server::tiny(&[]);
    assert_eq!(s.get("/health").0, 200);
    let (st, m) = s.get("/v1/models");
    assert_eq!(st, 200);
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 256);
    let (st, body) = s.get("/v1/nope");
    assert_openai_error(st, &body, 404, None);
    let (st, body) = s.get("/v1/completions");
    assert_openai_error(st, &body, 405, None);
}

#[test]
fn completion_usage_and_length_finish() {
    let s = Server::tiny(&[]);
    let (st, tok) = s.post(
        "/tokenize",
        &json!({"prompt": "hello world", "add_special_tokens": false}),
    );
    assert_eq!(st, 200);
    let n_prompt = tok["count"].as_u64().unwrap();
    assert_eq!(n_prompt, 2, "merges make 'hello' and ' world': {tok}");
    let (st, r) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": "hello world", "max_tokens": 7, "ignore_eos": true, "temperature": 0}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["prompt_tokens"], n_prompt);
    assert_eq!(r["usage"]["completion_tokens"], 7);
    assert_eq!(r["usage"]["total_tokens"], n_prompt + 7);
    // Token-id prompts are accepted, and detokenize inverts tokenize.
    let (st, r2) = s.post(
        "/v1/completions",
        &json!({"prompt": tok["tokens"], "max_tokens": 7, "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(st, 200);
    assert_eq!(r2["choices"][0]["text"], r["choices"][0]["text"]);
    // Text longer than the context could hold is refused before it is tokenized.
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "<|im_end|>".repeat(100_000)}),
    );
    assert_openai_error(st, &b, 400, Some("prompt"));
    let (_, d) = s.post("/detokenize", &json!({"tokens": tok["tokens"]}));
    assert_eq!(d["prompt"], "hello world");
}

#[test]
fn echo_with_logprobs_has_vllm_shape() {
    let s = Server::tiny(&[]);
    let ids = [104u32, 101, 108, 108, 111];
    let (st, r) = s.post("/v1/completions", &json!({"prompt": ids, "max_tokens": 1, "echo": true, "logprobs": 3, "temperature": 0, "return_tokens_as_token_ids": true}));
    assert_eq!(st, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), ids.len() + 1);
    assert!(top[0].is_null());
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    for entry in &top[1..] {
        let m = entry.as_object().unwrap();
        assert_eq!(m.len(), 3);
        assert!(m.keys().all(|k| k.starts_with("token_id:")));
        assert!(m.values().all(|v| v.as_f64().unwrap() <= 0.0));
    }
    assert_eq!(lp["tokens"][0], "token_id:104");
    assert!(r["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("hello"));
}

#[test]
fn chat_completion_plain_and_streamed_with_usage() {
    let s = Server::tiny(&[]);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "ignore_eos": true, "temperature": 0});
    let (st, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["usage"]["completion_tokens"], 12);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &sb);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        r["choices"][0]["message"]["content"].as_str().unwrap(),
        "streamed text equals the non-streamed text"
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], r["usage"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
}

#[test]
fn streamed_completion_without_usage() {
    let s = Server::tiny(&[]);
    let events = s.stream(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 5, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[test]
fn same_seed_same_text_and_stop_strings_across_tokens() {
    let s = Server::tiny(&[]);
    let req = |extra: Value| {
        let mut b = json!({"prompt": "hello world", "max_tokens": 24, "ignore_eos": true, "temperature": 0.9, "seed": 1234});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, r) = s.post("/v1/completions", &b);
        assert_eq!(st, 200, "{r}");
        (
            r["choices"][0]["text"].as_str().unwrap().to_string(),
            r["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let (full, _) = req(json!({}));
    assert_eq!(
        req(json!({})).0,
        full,
        "same seed, same request, same output"
    );
    // The tiny model's tokens are single bytes or short merges, so a 3-character stop string
    // taken from the middle of the output spans token boundaries.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "need some text: {full:?}");
    let stop: String = chars[6..9].iter().collect();
    let cut = full.find(&stop).unwrap();
    let (text, finish) = req(json!({"stop": [stop.clone()]}));
    assert_eq!(
        (text.as_str(), finish.as_str()),
        (&full[..cut], "stop"),
        "stop {stop:?}"
    );
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let s = Server::tiny(&["--max-body-bytes", "2048"]);
    let (st, b, _) = s.post_raw("/v1/completions", b"{not json");
    assert_openai_error(st, &b, 400, None);
    let (st, b, _) = s.post_raw("/v1/chat/completions", br#"{"messages": "not a list"}"#);
    assert_openai_error(st, &b, 400, None);
    let (st, b) = s.post("/v1/completions", &json!({"model": "gpt-9", "prompt": "x"}));
    assert_openai_error(st, &b, 404, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 300}),
    );
    assert_openai_error(st, &b, 400, None);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context length"),
        "{b}"
    );
    let big = json!({"prompt": "x".repeat(4096)});
    let (st, b, _) = s.post_raw("/v1/completions", big.to_string().as_bytes());
    assert_openai_error(st, &b, 413, None);
    for (field, value) in [
        ("temperature", json!(5)),
        ("top_p", json!(0)),
        ("top_k", json!(-3)),
        ("min_p", json!(1.5)),
        ("presence_penalty", json!(3)),
        ("logprobs", json!(50)),
        ("n", json!(0)),
        ("n", json!(17)),
    ] {
        let mut body = json!({"prompt": "hi", "max_tokens": 2});
        body[field] = value;
        let (st, b) = s.post("/v1/completions", &body);
        assert_openai_error(st, &b, 400, Some(field));
    }
    let (st, b) = s.post("/v1/chat/completions", &json!({"messages": []}));
    assert_openai_error(st, &b, 400, Some("messages"));
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    );
    assert_openai_error(st, &b, 400, Some("top_logprobs"));
    let (st, b) = s.post("/v1/completions", &json!({"prompt": [1, 2, 999999]}));
    assert_openai_error(st, &b, 400, None);
    let (st, b) = s.post("/v1/completions", &json!({"prompt": ""}));
    assert_openai_error(st, &b, 400, Some("prompt"));
    let (st, b) = s.post("/detokenize", &json!({"tokens": [999999]}));
    assert_openai_error(st, &b, 400, Some("tokens"));
    // Unknown fields are ignored, and the server still answers normally.
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 2, "frobnicate": {"x": 1}}),
    );
    assert_eq!(st, 200, "{r}");
}

#[test]
fn a_client_that_disconnects_mid_stream_does_not_wedge_the_engine() {
    use std::io::{Read, Write};
    let s = Server::tiny(&["--max-num-seqs", "1"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let body = json!({"prompt": "hello", "max_tokens": 250, "ignore_eos": true, "stream": true})
        .to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", common::ADMIN_KEY, body.len()).unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    drop(c);
    // With one sequence slot, this only finishes if the abandoned stream was aborted or ended.
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 3, "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    // The abandoned stream left one audit record (499) and no open reservation.
    let abandoned = || {
        let (_, audit) = s.get("/admin/v1/audit?limit=1000");
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] == 499)
            .cloned()
            .collect::<Vec<Value>>()
    };
    assert!(common::wait_until(Duration::from_secs(10), || !abandoned().is_empty()));
    let records = abandoned();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]["completion_tokens"].as_u64().unwrap() < 250);
    let (_, ledger) = s.get("/admin/v1/ledger");
    assert_eq!(ledger["open_requests"], 0, "{ledger}");
}

#[test]
fn n_choices_plain_and_streamed() {
    let s = Server::tiny(&[]);
    let body = json!({"prompt": "hello", "max_tokens": 6, "ignore_eos": true, "temperature": 1.0, "seed": 5, "n": 3});
    let (st, r) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(
        choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(r["usage"]["completion_tokens"], 18);
    assert_eq!(r["usage"]["prompt_tokens"], 1);
    // Seeded choices repeat, and differ from each other.
    assert_eq!(s.post("/v1/completions", &body).1["choices"], r["choices"]);
    assert_ne!(choices[0]["text"], choices[1]["text"]);

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": true, "n": 2, "stream": true, "stream_options": {"include_usage": true}});
    let events = s.stream("/v1/chat/completions", &chat);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"].get(0).is_some_and(|ch| ch["index"] == i))
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            mine.iter()
                .filter(|c| c["choices"][0]["finish_reason"] == "length")
                .count(),
            1,
            "choice {i}"
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 10);
}

#[test]
fn request_timeout_cancels_and_answers_408() {
    // A random model big enough that 2,000 tokens take seconds, against a 50 ms limit.
    let s = Server::slow(&["--request-timeout", "0.05", "--max-num-seqs", "1"]);
    let long = json!({"prompt": "hello", "max_tokens": 2000, "ignore_eos": true});
    let (st, b) = s.post("/v1/completions", &long);
    assert_openai_error(st, &b, 408, None);
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().any(|e| e.contains("timed out")), "{events:?}");
    // The cancelled sequences left the single slot free.
    let (st, r) = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 2, "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{r}");
}
