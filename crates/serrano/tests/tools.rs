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
        stdout.lines().last().is_some_and(|l| l == "44 passed, 0 failed"),
        "{stdout}"
    );
}
