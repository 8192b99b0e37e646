//! The official `openai` Python SDK, unchanged, against the real server and model.
//! The SDK is installed into a virtualenv under target/ on first use (CI's .ci/run does it first).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{real_model, Server};

#[test]
fn openai_python_sdk_chat_stream_and_legacy_completion() {
    let py = common::python_venv("pyenv", &["openai>=1.40"], "import openai");
    let s = Server::start(&real_model(), &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("{}/v1", s.base))
        .arg(common::ADMIN_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK script failed");
    assert!(stdout
        .lines()
        .last()
        .is_some_and(|l| l == "3 passed, 0 failed"));
}
