//! The served model swapped at run time, under load: a config whose local backend names another
//! GGUF loads and checks it beside the running one, moves new requests to it, and lets the old
//! one drain and stop; rolling the config back is the same move back. No request fails.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, Server, ADMIN_KEY};
use serde_json::{json, Value};
use serrano_engine::testing::TinyModel;

fn config(model: &std::path::Path) -> String {
    format!(
        "[[backend]]\nname = \"local\"\nkind = \"local\"\nmodel = \"{}\"\nregion = \"here\"\n\
         tier = \"cpu\"\nmodels = [\"chat\"]\n",
        model.display()
    )
}

fn apply(s: &Server, text: &str) -> Value {
    let r = ureq::post(&s.url("/admin/v1/config"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_string(text)
        .unwrap();
    r.into_json().unwrap()
}

/// The same prompt's token count tells the two tokenizers, so the two models, apart.
const PROMPT: &str = "Swapping models under load, one request at a time.";

#[test]
fn the_model_is_swapped_and_rolled_back_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny-swap.gguf");
    TinyModel {
        context_length: 512,
        seed: 11,
        ..Default::default()
    }
    .write(&tiny)
    .unwrap();
    let real = common::real_model();
    let s = Server::random_with_config(TinyModel::default(), &config(&real), &[]);
    let prompt_tokens = |s: &Server| {
        let body = json!({"model": "chat", "prompt": PROMPT, "max_tokens": 1});
        let (st, v) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{v}");
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let before = prompt_tokens(&s);

    // Four clients, each sending one request after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop) = (s.url("/v1/completions"), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"model": "chat", "prompt": PROMPT, "max_tokens": 4});
                    let r = ureq::post(&url)
                        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
                        .timeout(Duration::from_secs(60))
                        .send_json(body);
                    let v: Value = match r {
                        Ok(r) => r.into_json().unwrap(),
                        Err(e) => panic!("a request failed during the swap: {e}"),
                    };
                    seen.push(v["usage"]["prompt_tokens"].as_u64().unwrap());
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let swapped = apply(&s, &config(&tiny));
    assert_eq!(swapped["version"], 2, "{swapped}");
    std::thread::sleep(Duration::from_millis(1500));
    let r = ureq::post(&s.url("/admin/v1/config/rollback"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_json(json!({"version": 1}))
        .unwrap();
    assert_eq!(r.into_json::<Value>().unwrap()["version"], 1);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Vec<u64>> = clients.into_iter().map(|c| c.join().unwrap()).collect();

    // Each client saw the real model, then the tiny one, then the real one again: one switch
    // each way, never back and forth.
    let after_swap = prompt_tokens(&s);
    assert_eq!(after_swap, before, "rolled back to the first model");
    let mut tiny_tokens = None;
    for client in &seen {
        let mut runs: Vec<u64> = client.clone();
        runs.dedup();
        assert_eq!(runs.len(), 3, "one switch each way: {client:?}");
        assert_eq!((runs[0], runs[2]), (before, before), "{client:?}");
        assert_ne!(runs[1], before);
        assert_eq!(*tiny_tokens.get_or_insert(runs[1]), runs[1]);
    }
    // The tiny model's engine drained and stopped once no config named it.
    let stopped = || {
        s.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("engine stopped") && l.contains("tiny-swap"))
    };
    assert!(
        wait_until(Duration::from_secs(30), stopped),
        "the swapped-out engine did not stop"
    );
    let metrics = s.metrics_text();
    assert!(!metrics.contains("model_name=\"tiny-swap\""), "{metrics}");
    // A model that does not load is refused with its config, and the running one stays.
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really").unwrap();
    let refused = ureq::post(&s.url("/admin/v1/config"))
        .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
        .send_string(&config(&bad));
    let Err(ureq::Error::Status(400, _)) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(s.get("/admin/v1/config").1["version"], 1);
    assert_eq!(prompt_tokens(&s), before);
}
