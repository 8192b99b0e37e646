//! The engine agrees with llama.cpp on the default model: `shared/golden/check.py` against the
//! real server (tokenization exact, teacher-forced log-probs within tolerance, confident argmax).

mod common;

use std::process::Command;

use common::{real_model, shared_dir, Server};

#[test]
fn golden_check_against_llama_cpp_reference() {
    let s = Server::start(&real_model(), &[]);
    let script = shared_dir().join("golden/check.py");
    assert!(
        script.exists(),
        "{} is missing: shared/ must sit beside the checkout",
        script.display()
    );
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

#[test]
fn chat_answers_a_factual_question() {
    let s = Server::start(&real_model(), &[]);
    let (st, r) = s.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(
        r["choices"][0]["finish_reason"], "stop",
        "a short answer ends on the end-of-turn token: {text}"
    );
    assert!(!text.contains("<|im_end|>"));
}
