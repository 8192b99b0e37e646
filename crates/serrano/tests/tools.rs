//! Tool calling and structured outputs on the local engine through the official `openai` Python
//! SDK, against the real default model: required calls and `json_schema` answers are valid 20
//! times out of 20 (checked with Python's `jsonschema`), streamed calls reassemble, `none`
//! answers in words. The SDK and `jsonschema` go into a virtualenv under target/ on first use.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{real_model, Server};

#[test]
fn tools_and_structured_outputs_through_the_openai_sdk() {
    let py = common::python_venv(
        "pyenv",
        &["openai>=1.40", "jsonschema>=4"],
        "import openai, jsonschema",
    );
    let s = Server::start(&real_model(), &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools_sdk.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("{}/v1", s.base))
        .arg(common::ADMIN_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l == "45 passed, 0 failed"),
        "{stdout}"
    );
}

/// A constrained sequence in a batch beside unconstrained ones: each gives the same tokens as
/// alone (the mask touches only its own sequence's logits; the engine's numerics do not depend
/// on batch-mates).
#[test]
fn constrained_and_unconstrained_sequences_batch_without_changing_each_other() {
    let s = Server::start(&real_model(), &[]);
    let bodies: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            let mut b = serde_json::json!({
                "messages": [{"role": "user", "content": format!("Describe city number {i}.")}],
                "max_tokens": 40,
                "temperature": 0
            });
            if i % 2 == 0 {
                b["response_format"] = serde_json::json!({"type": "json_schema", "json_schema": {"name": "c",
                    "schema": {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                    "required": ["name", "size"], "additionalProperties": false}}});
            }
            b
        })
        .collect();
    let text = |s: &Server, b: &serde_json::Value| {
        let (st, v) = s.post("/v1/chat/completions", b);
        assert_eq!(st, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let alone: Vec<String> = bodies.iter().map(|b| text(&s, b)).collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies.iter().map(|b| scope.spawn(|| text(&s, b))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    assert!(
        serde_json::from_str::<serde_json::Value>(&alone[0]).is_ok(),
        "{}",
        alone[0]
    );
}
