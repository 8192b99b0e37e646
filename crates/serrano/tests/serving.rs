//! The serving core over real HTTP with the real model: concurrency, batching invariance,
//! chunked prefill, cancellation, backpressure, tenant fairness and metrics.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{golden_dir, real_model, Server};
use serde_json::{json, Value};

/// The tests here measure latency with the real model: run them one at a time so they do not
/// compete for the two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn metric(s: &Server, name: &str) -> f64 {
    let text = common::authed_get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Batched equals unbatched: the golden prompts' greedy outputs and log-probs are the same when
/// 8 of them run together as when each runs alone (the engine's numerics are batch-invariant).
#[test]
fn batched_equals_unbatched_on_golden_prompts() {
    let _serial = serial();
    let s = Server::start(&real_model(), &[]);
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("smollm2-135m-q4_1.json")).unwrap(),
    )
    .unwrap();
    let mut prompts: Vec<Value> = golden["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ids"].clone())
        .collect();
    prompts.extend(
        golden["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["prompt_ids"].clone()),
    );
    prompts.truncate(8);
    assert_eq!(prompts.len(), 8);
    let body = |p: &Value| json!({"prompt": p, "max_tokens": 12, "temperature": 0, "logprobs": 3, "ignore_eos": true});
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| s.post("/v1/completions", &body(p)).1["choices"][0].clone())
        .collect();
    let base = s.base.clone();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, b) = (format!("{base}/v1/completions"), body(p));
            std::thread::spawn(move || {
                common::authed_post(&url)
                    .send_json(b)
                    .unwrap()
                    .into_json::<Value>()
                    .unwrap()["choices"][0]
                    .clone()
            })
        })
        .collect();
    for (h, solo) in handles.into_iter().zip(&alone) {
        let batched = h.join().unwrap();
        assert_eq!(batched["text"], solo["text"]);
        assert_eq!(
            batched["logprobs"]["token_logprobs"],
            solo["logprobs"]["token_logprobs"]
        );
    }
}

#[test]
fn sixteen_concurrent_streams_complete_correctly_and_blocks_come_back() {
    let _serial = serial();
    let s = Server::start(&real_model(), &[]);
    let topics = [
        "the sea",
        "a city",
        "winter",
        "a robot",
        "music",
        "coffee",
        "the moon",
        "trains",
        "rain",
        "a garden",
        "chess",
        "bread",
        "mountains",
        "a library",
        "the wind",
        "fire",
    ];
    let body = |t: &str, stream: bool| json!({"messages": [{"role": "user", "content": format!("Write one sentence about {t}.")}], "max_tokens": 24, "temperature": 0, "stream": stream});
    let solo: Vec<String> = topics
        .iter()
        .map(|t| {
            s.post("/v1/chat/completions", &body(t, false)).1["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let base = s.base.clone();
    let handles: Vec<_> = topics
        .iter()
        .map(|t| {
            let (url, b) = (format!("{base}/v1/chat/completions"), body(t, true));
            std::thread::spawn(move || {
                let mut text = String::new();
                std::io::Read::read_to_string(
                    &mut common::authed_post(&url)
                        .send_json(b)
                        .unwrap()
                        .into_reader(),
                    &mut text,
                )
                .unwrap();
                let events: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                assert_eq!(events.last(), Some(&"[DONE]"));
                events[..events.len() - 1]
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e).unwrap())
                    .filter_map(|c| {
                        c["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect::<String>()
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&solo) {
        assert_eq!(&h.join().unwrap(), want);
    }
    assert!(
        common::wait_until(Duration::from_secs(5), || metric(
            &s,
            "serrano:kv_cache_usage_perc"
        ) == 0.0),
        "KV blocks not returned"
    );
    assert_eq!(metric(&s, "serrano:num_requests_running"), 0.0);
    assert!(metric(&s, "serrano:request_success_total") >= 32.0);
    assert!(metric(&s, "serrano:generation_tokens_total") > 0.0);
    assert!(metric(&s, "serrano:time_to_first_token_seconds_count") >= 32.0);
    // The shared system prompt of the chat template is served from the prefix cache.
    assert!(metric(&s, "serrano:prefix_cache_hits_total") > 0.0);
}

#[test]
fn a_short_request_is_not_stuck_behind_a_long_one() {
    let _serial = serial();
    // A small step budget makes the long prompt's prefill take many steps.
    let s = Server::start(&real_model(), &["--max-batch-tokens", "64"]);
    let long_done = Arc::new(AtomicBool::new(false));
    let (url, flag) = (s.url("/v1/completions"), long_done.clone());
    let long = std::thread::spawn(move || {
        let prompt = "Tell me everything about the history of lighthouses. ".repeat(40);
        let r: Value = common::authed_post(&url)
            .send_json(json!({"prompt": prompt, "max_tokens": 200, "ignore_eos": true}))
            .unwrap()
            .into_json()
            .unwrap();
        flag.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (st, r) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    let short = t.elapsed();
    assert_eq!(st, 200, "{r}");
    assert!(
        !long_done.load(Ordering::SeqCst),
        "the long request finished first; the test proves nothing"
    );
    let long_r = long.join().unwrap();
    assert_eq!(long_r["usage"]["completion_tokens"], 200);
    eprintln!("short request during a long prefill: {short:?}");
    assert!(
        short < Duration::from_secs(2),
        "short request took {short:?}"
    );
}

#[test]
fn disconnect_frees_blocks() {
    let _serial = serial();
    use std::io::{Read, Write};
    let s = Server::start(&real_model(), &[]);
    let addr = s.base.trim_start_matches("http://").to_string();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true, "stream": true}).to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", common::ADMIN_KEY, body.len()).unwrap();
    let mut buf = [0u8; 4096];
    let _ = c.read(&mut buf).unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || metric(
        &s,
        "serrano:kv_cache_usage_perc"
    ) > 0.0));
    drop(c);
    assert!(
        common::wait_until(Duration::from_secs(10), || metric(
            &s,
            "serrano:kv_cache_usage_perc"
        ) == 0.0),
        "blocks of a disconnected client were not freed"
    );
    assert_eq!(metric(&s, "serrano:num_requests_running"), 0.0);
}

#[test]
fn queue_overflow_is_429_with_retry_after() {
    let s = Server::tiny(&["--max-num-seqs", "1", "--max-waiting", "1"]);
    let base = s.base.clone();
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let url = format!("{base}/v1/completions");
            std::thread::spawn(move || {
                match common::authed_post(&url)
                    .send_json(json!({"prompt": "hello", "max_tokens": 240, "ignore_eos": true}))
                {
                    Ok(r) => (r.status(), None),
                    Err(ureq::Error::Status(code, r)) => {
                        (code, r.header("retry-after").map(str::to_string))
                    }
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!refused.is_empty(), "{results:?}");
    assert!(
        refused.iter().all(|r| r.1.is_some()),
        "429 without Retry-After"
    );
    assert!(
        results.iter().all(|r| r.0 == 200 || r.0 == 429),
        "{results:?}"
    );
}

/// Tenant A floods 40 requests; tenant B's single request, sent after, is admitted at the first
/// free slot instead of behind A's queue. Bound: B finishes before A has finished 12 of its 40
/// (with 4 slots, FIFO admission would put B behind all 40).
#[test]
fn a_flooding_tenant_does_not_delay_another() {
    let _serial = serial();
    let s = Server::start(&real_model(), &["--max-num-seqs", "4"]);
    s.tenant("flood");
    s.tenant("quiet");
    let a_done = Arc::new(AtomicUsize::new(0));
    let base = s.base.clone();
    let flood: Vec<_> = (0..40)
        .map(|i| {
            let (url, done) = (format!("{base}/v1/completions"), a_done.clone());
            std::thread::spawn(move || {
                let r = common::authed_post(&url).set("x-serrano-tenant", "flood").send_json(json!({"prompt": format!("Request {i}: the"), "max_tokens": 16, "ignore_eos": true}));
                assert_eq!(r.unwrap().status(), 200);
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    assert!(common::wait_until(Duration::from_secs(20), || metric(
        &s,
        "serrano:num_requests_waiting"
    ) >= 20.0));
    let r = common::authed_post(&s.url("/v1/completions"))
        .set("x-serrano-tenant", "quiet")
        .send_json(json!({"prompt": "Hello", "max_tokens": 16, "ignore_eos": true}))
        .unwrap();
    assert_eq!(r.status(), 200);
    let done_then = a_done.load(Ordering::SeqCst);
    for h in flood {
        h.join().unwrap();
    }
    eprintln!("quiet tenant finished after {done_then} of the flood's 40");
    assert!(
        done_then < 12,
        "the quiet tenant waited for {done_then} of the flood's 40 requests"
    );
}

/// One tenant filling its share of the queue gets 429s; another tenant is still admitted.
#[test]
fn a_tenant_over_its_share_gets_429_and_others_do_not() {
    let _serial = serial();
    // Per-tenant limit: max-waiting / 2 + max-num-seqs = 2 requests in flight. The flood's
    // requests are long (seconds each), so all six arrive while the first two are in flight.
    let s = Server::slow(&["--max-num-seqs", "1", "--max-waiting", "2"]);
    s.tenant("flood");
    s.tenant("other");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for _ in 0..6 {
        let (url, done) = (s.url("/v1/completions"), done_tx.clone());
        std::thread::spawn(move || {
            let code = match common::authed_post(&url)
                .set("x-serrano-tenant", "flood")
                .send_json(json!({"prompt": "hello", "max_tokens": 2000, "ignore_eos": true}))
            {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(code, _)) => code,
                Err(_) => 0, // the server is stopped at the end of the test
            };
            let _ = done.send(code);
        });
    }
    // Four refusals arrive at once; the two accepted requests keep running.
    let refused: Vec<u16> = (0..4)
        .map(|_| {
            done_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("refusals come back at once")
        })
        .collect();
    assert_eq!(refused, vec![429, 429, 429, 429]);
    // The flood holds at most its share of 2; once both are inside the engine, the submission
    // queue (2 slots) has room. Without per-tenant shares the flood would hold the queue too,
    // and "other" would get 429.
    let in_flight =
        || metric(&s, "serrano:num_requests_running") + metric(&s, "serrano:num_requests_waiting");
    assert!(
        common::wait_until(Duration::from_secs(10), || in_flight() >= 2.0),
        "in flight: {}",
        in_flight()
    );
    let r = common::authed_post(&s.url("/v1/completions"))
        .set("x-serrano-tenant", "other")
        .send_json(json!({"prompt": "hi", "max_tokens": 2, "ignore_eos": true}));
    assert_eq!(r.map(|r| r.status()).unwrap_or_else(|e| panic!("{e}")), 200);
}
