//! The official `openai` Python SDK, unchanged, against the real server and model.
//! The SDK is installed into a virtualenv under target/ on first use (CI's .ci/run does it first).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{real_model, Server};

fn venv_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv");
    let py = venv.join("bin/python");
    let has_openai = || {
        Command::new(&py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "openai>=1.40",
                ])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has_openai(),
            "could not install the openai SDK into {}",
            venv.display()
        );
    }
    py
}

#[test]
fn openai_python_sdk_chat_stream_and_legacy_completion() {
    let py = venv_python();
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
