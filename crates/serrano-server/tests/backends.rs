//! The contract every [`Backend`] keeps, run against each implementation: the in-process engine
//! (`LocalBackend`) and an OpenAI-compatible upstream (`Upstream`, here a real serrano server on
//! loopback). A new backend (a simulated accelerator, a CUDA engine) joins the list below.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use serrano_api as api;
use serrano_server::backend::{AttemptCtx, Event, Fault, Generation, Request};
use serrano_server::engines::LocalEngines;
use serrano_server::local::LocalBackend;
use serrano_server::upstream::Upstream;
use serrano_server::Backend;

/// A tiny random-weight engine with a long context (a cancelled generation has far to go).
fn engine(dir: &tempfile::TempDir) -> serrano_engine::EngineHandle {
    let path = dir.path().join("tiny.gguf");
    serrano_engine::testing::TinyModel {
        context_length: 8192,
        ..Default::default()
    }
    .write(&path)
    .unwrap();
    serrano_engine::start(&path, Default::default()).unwrap()
}

/// A real serrano server on loopback serving `engine` as `tiny`, without keys.
async fn serrano_upstream(dir: &tempfile::TempDir, engine: serrano_engine::EngineHandle) -> String {
    let gov = serrano_gov::Governance::open(serrano_gov::GovConfig::new(dir.path().join("g.db")))
        .await
        .unwrap();
    let auth = serrano_server::AuthConfig {
        anonymous: Some(gov.anonymous().await.unwrap()),
        jwt: None,
    };
    let config = serrano_router::config::render(&[serrano_router::config::Backend::local("here")]);
    let engines = LocalEngines::new(Some((engine, vec!["tiny".into()])), None);
    let routing = serrano_server::routing::Routing::start(
        gov.clone(),
        &config,
        "test",
        engines,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let app = serrano_server::router(routing, gov, auth, Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serrano_server::serve_listener(
        listener,
        app,
        std::future::pending(),
    ));
    format!("http://{addr}/v1")
}

fn chat(body: Value) -> Generation {
    let mut body = body;
    body["messages"] = json!([{"role": "user", "content": "hello there"}]);
    let r: api::ChatCompletionRequest = serde_json::from_value(body).unwrap();
    Generation::new(Request::Chat(r), "tiny".into(), "t".into(), 0).unwrap()
}

fn ctx() -> AttemptCtx {
    AttemptCtx {
        deadline: tokio::time::Instant::now() + Duration::from_secs(60),
    }
}

async fn run(b: &dyn Backend, gen: &Generation) -> Vec<Event> {
    let work = b.prepare(gen, "tiny").await.unwrap();
    let events = b.generate(gen, work, &ctx()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), events.collect::<Vec<_>>())
        .await
        .unwrap()
}

/// Tokens the engine behind a backend has run through its steps so far (counted per step, so a
/// cancelled request's count too), and whether it is idle.
fn engine_state(e: &serrano_engine::EngineHandle) -> (u64, bool) {
    let m = e.metrics();
    let text = m.encode();
    let generated = text
        .lines()
        .filter(|l| l.starts_with("serrano:iteration_tokens_total_sum"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let idle = m.num_requests_running.get() == 0 && m.num_requests_waiting.get() == 0;
    (generated, idle)
}

/// What every backend must do; `state` reports the tokens its engine generated and whether it
/// has nothing in flight.
async fn conformance(name: &str, b: &dyn Backend, state: impl Fn() -> (u64, bool)) {
    // Limits: a context length known, and the reservation's numbers from `prepare`.
    let ctx_len = b.context_length("tiny").expect("a context length");
    assert!(ctx_len >= 64, "{name}");
    let gen = chat(json!({"max_tokens": 5, "temperature": 0, "ignore_eos": true}));
    let work = b.prepare(&gen, "tiny").await.unwrap();
    assert!(work.prompt_tokens > 0, "{name}");
    assert_eq!(work.max_tokens, 5, "{name}");
    drop(work);

    // Whole and streamed: text, one finish per choice, usage last, no error.
    for stream in [false, true] {
        let gen = chat(
            json!({"max_tokens": 5, "temperature": 0, "ignore_eos": true, "n": 2, "stream": stream}),
        );
        let events = run(b, &gen).await;
        assert!(
            !events.iter().any(|e| matches!(e, Event::Error(_))),
            "{name}: {events:?}"
        );
        let mut finished: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finish { index, reason, .. } => {
                    assert_eq!(reason, "length", "{name}");
                    Some(*index)
                }
                _ => None,
            })
            .collect();
        finished.sort();
        assert_eq!(finished, [0, 1], "{name} stream={stream}");
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                Event::Delta(d) => Some(d.text.as_str()),
                _ => None,
            })
            .collect();
        assert!(!text.is_empty(), "{name}");
        match events.last() {
            Some(Event::Usage {
                prompt_tokens,
                completion_tokens,
            }) => assert_eq!(
                (*prompt_tokens > 0, *completion_tokens),
                (true, 10),
                "{name}"
            ),
            other => panic!("{name}: usage must come last, got {other:?}"),
        }
    }

    // Cancellation: dropping the stream ends the work long before its 8,000 tokens.
    let (before, _) = state();
    let gen = chat(json!({"max_tokens": 8000, "ignore_eos": true, "stream": true}));
    let work = b.prepare(&gen, "tiny").await.unwrap();
    let mut events = b.generate(&gen, work, &ctx()).await.unwrap();
    let first = events.next().await;
    assert!(matches!(first, Some(Event::Delta(_))), "{name}: {first:?}");
    drop(events);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !state().1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: still busy after cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = state().0 - before;
    assert!(generated < 4000, "{name}: {generated} tokens after cancel");

    // Errors: past the context is the request's fault, before anything runs.
    let gen = chat(json!({"max_tokens": ctx_len + 1}));
    let e = b.prepare(&gen, "tiny").await.err().expect("refused");
    assert_eq!(
        (e.fault, e.error.status.as_u16()),
        (Fault::Request, 400),
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let local_engine = engine(&dir);
    let local = LocalBackend::new("local", local_engine.clone());
    conformance("local", &local, || engine_state(&local_engine)).await;

    let up_dir = tempfile::tempdir().unwrap();
    let up_engine = engine(&up_dir);
    let url = serrano_upstream(&up_dir, up_engine.clone()).await;
    let mut spec = serrano_router::config::Backend::openai("up", &url, "r", vec!["tiny".into()]);
    spec.context_length = Some(8192);
    let up = Arc::new(Upstream::from_backend(&spec, Duration::from_secs(60)).unwrap());
    conformance("upstream", up.as_ref(), || engine_state(&up_engine)).await;
}
