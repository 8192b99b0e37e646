//! The engine agrees with llama.cpp on the default model: `testdata/golden/check.py` against the
//! real server (tokenization exact, teacher-forced log-probs within tolerance, confident argmax).

mod common;

use std::process::Command;

use common::{golden_dir, real_model, Server};

#[test]
fn golden_check_against_llama_cpp_reference() {
    // check.py sends no API key: it runs as the audited 'anonymous' tenant.
    let s = Server::start(&real_model(), &["--allow-anonymous"]);
    let script = golden_dir().join("check.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--base-url", &s.base])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        out.status.success() && last.ends_with(" 0 failed"),
        "golden check failed: {last}"
    );
    let passed: u32 = last
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        passed >= 20,
        "the golden file should yield at least 20 checks, got {passed}"
    );
}

/// Through the chat route (template, tokenizer, engine, greedy sampling): the rendered prompt is
/// token for token llama.cpp's, and the answer follows llama.cpp's greedy continuation for as
/// long as llama.cpp itself was confident (top-1/top-2 margin >= 0.5); past a near-tie two correct
/// implementations may branch.
#[test]
fn chat_route_follows_llama_cpp_greedy_continuations() {
    let s = Server::start(&real_model(), &[]);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("smollm2-135m-q4_1.json")).unwrap(),
    )
    .unwrap();
    let mut checked_tokens = 0;
    for case in golden["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let Some(user) = prompt
            .split("<|im_start|>user\n")
            .nth(1)
            .and_then(|r| r.split("<|im_end|>").next())
        else {
            continue;
        };
        let ids: Vec<u32> = case["completion_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let confident = case["margins"]
            .as_array()
            .unwrap()
            .iter()
            .take_while(|m| m.as_f64().unwrap() >= 0.5)
            .count();
        let (_, want) = s.post(
            "/detokenize",
            &serde_json::json!({"tokens": ids[..confident]}),
        );
        let body = serde_json::json!({"messages": [{"role": "user", "content": user}], "max_tokens": ids.len(), "temperature": 0});
        let (st, r) = s.post("/v1/chat/completions", &body);
        assert_eq!(st, 200, "{r}");
        assert_eq!(
            r["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            case["prompt_ids"].as_array().unwrap().len(),
            "{}: rendered prompt differs",
            case["name"]
        );
        let text = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            text.starts_with(want["prompt"].as_str().unwrap()),
            "{}: {text:?} does not start with {}",
            case["name"],
            want["prompt"]
        );
        assert!(!text.contains("<|im_end|>"));
        checked_tokens += confident;
    }
    assert!(
        checked_tokens >= 10,
        "the golden chats should pin at least 10 tokens, pinned {checked_tokens}"
    );
}
