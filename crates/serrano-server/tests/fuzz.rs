//! The JSON request path under arbitrary input: bodies built from the request fields with
//! values of any JSON type, and raw bytes, sent to the real application in-process (gate,
//! pipeline, local engine). Every answer is a client error or a success; nothing panics, and no
//! status is 5xx but the deliberate 503s. Bounded (a few hundred cases) so CI stays quick.

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

struct App {
    router: axum::Router,
    key: String,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn app() -> &'static App {
    static APP: std::sync::OnceLock<App> = std::sync::OnceLock::new();
    APP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (router, key) = rt.block_on(async {
            let model = dir.path().join("tiny.gguf");
            serrano_engine::testing::TinyModel::default()
                .write(&model)
                .unwrap();
            let engine = serrano_engine::start(&model, Default::default()).unwrap();
            let gov = serrano_gov::Governance::open(serrano_gov::GovConfig::new(
                dir.path().join("gov.db"),
            ))
            .await
            .unwrap();
            let key = gov.bootstrap(None).await.unwrap().unwrap();
            let config =
                serrano_router::config::render(&[serrano_router::config::Backend::local("here")]);
            let engines = serrano_server::engines::LocalEngines::new(
                Some((engine, vec!["tiny".into()])),
                None,
            );
            let routing = serrano_server::routing::Routing::start(
                gov.clone(),
                &config,
                "test",
                engines,
                std::time::Duration::from_secs(60),
            )
            .await
            .unwrap();
            let app = serrano_server::router(routing, gov, Default::default(), Default::default());
            (app.router, key)
        });
        App {
            router,
            key,
            rt,
            _dir: dir,
        }
    })
}

/// Posts `body` to `path` with the admin key; the status.
fn post(path: &str, body: Vec<u8>) -> u16 {
    let a = app();
    a.rt.block_on(async {
        let req = Request::post(path)
            .header("authorization", format!("Bearer {}", a.key))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = a.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        // Read the whole answer: a stream's errors come in its body.
        let _ = axum::body::to_bytes(resp.into_body(), 16 << 20).await;
        status
    })
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!(u64::MAX)),
        ".{0,40}".prop_map(Value::from),
        Just(json!("<|im_start|>system")),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("role".to_string()),
                    Just("content".to_string()),
                    Just("type".to_string()),
                    Just("text".to_string()),
                    Just("name".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "seed",
    "logit_bias",
    "stop_token_ids",
    "tools",
    "tool_choice",
    "response_format",
    "best_of",
    "suffix",
    "ignore_eos",
    "user",
    "return_tokens_as_token_ids",
];

/// A request body: a few of the fields any route reads, each with any value, on top of a
/// minimal valid request (so that validation past the first field gets exercised too).
fn body() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec((0..FIELDS.len(), value()), 0..5),
        any::<bool>(),
    )
        .prop_map(|(fields, chat)| {
            let mut m = Map::new();
            if chat {
                m.insert(
                    "messages".into(),
                    json!([{"role": "user", "content": "hi"}]),
                );
            } else {
                m.insert("prompt".into(), json!("hi"));
            }
            m.insert("max_tokens".into(), json!(2));
            for (i, v) in fields {
                m.insert(FIELDS[i].into(), v);
            }
            Value::Object(m)
        })
}

fn acceptable(status: u16) -> bool {
    status < 500 || status == 503
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_json_body_gets_a_client_error_or_an_answer(b in body(), chat in any::<bool>()) {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let status = post(path, b.to_string().into_bytes());
        prop_assert!(acceptable(status), "{status} for {path} {b}");
    }

    #[test]
    fn any_bytes_get_a_client_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for path in ["/v1/chat/completions", "/v1/completions", "/tokenize", "/admin/v1/budgets"] {
            let status = post(path, bytes.clone());
            prop_assert!(acceptable(status), "{status} for {path}");
        }
    }
}
