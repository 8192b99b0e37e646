//! A private PostgreSQL server for tests: its own cluster in a temporary directory, on a free
//! loopback port, stopped and deleted on drop. Tests of the PostgreSQL store run against a
//! real server, never a mock; `.ci/run` installs PostgreSQL (Debian's `postgresql`).
//!
//! Not part of the API: built only for tests and with the `testing` feature, which the `serrano`
//! crate's tests enable to start one too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct TestPg {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    url: String,
    /// The server's options (port included), so that a restart listens where it did.
    opts: String,
}

impl TestPg {
    /// Starts a server (`initdb` then `pg_ctl start`), or says why it cannot.
    pub fn start() -> Result<TestPg, String> {
        let bin = find_bin().ok_or(
            "PostgreSQL's initdb was not found in PATH or /usr/lib/postgresql/*/bin: \
             install PostgreSQL (apt-get install postgresql) to run these tests",
        )?;
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let as_postgres = running_as_root();
        let dir = std::env::temp_dir().join(format!("serrano-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let server = TestPg {
            dir,
            bin,
            as_postgres,
            url: String::new(),
            opts: String::new(),
        };
        if as_postgres {
            server.run("chown", &["-R", "postgres:", &server.dir_str()], false)?;
        }
        let data = server.dir.join("data").display().to_string();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "serrano",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            true,
        )?;
        let mut server = server;
        let mut last = String::new();
        // The port is free when picked; another process may take it before the server binds.
        for _ in 0..3 {
            let port = free_port()?;
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                server.dir_str()
            );
            let log = server.dir.join("server.log").display().to_string();
            match server.run(
                "pg_ctl",
                &[
                    "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
                ],
                true,
            ) {
                Ok(()) => {
                    server.url = format!("postgres://serrano@127.0.0.1:{port}/postgres");
                    server.opts = opts;
                    return Ok(server);
                }
                Err(e) => {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    last = format!("{e}\n{tail}");
                }
            }
        }
        Err(format!("the test PostgreSQL server did not start: {last}"))
    }

    /// `postgres://serrano@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server as a crash would (`pg_ctl stop -m immediate`: no shutdown checkpoint,
    /// and WAL still in shared buffers is lost), then starts it again on the same port, so that
    /// what survives is what recovery replays from the WAL files.
    pub fn crash_and_restart(&self) -> Result<(), String> {
        let data = self.dir.join("data").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "stop"],
            true,
        )?;
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &self.opts, "-w", "-t", "60", "start",
            ],
            true,
        )
    }

    fn dir_str(&self) -> String {
        self.dir.display().to_string()
    }

    /// Runs a tool (one of PostgreSQL's when `pg`), as `postgres` when running as root.
    fn run(&self, tool: &str, args: &[&str], pg: bool) -> Result<(), String> {
        let program = if pg {
            self.bin.join(tool)
        } else {
            PathBuf::from(tool)
        };
        let mut cmd = if pg && self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} {} failed: {}{}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if !self.url.is_empty() {
            let data = self.dir.join("data").display().to_string();
            let _ = self.run(
                "pg_ctl",
                &["-D", &data, "-m", "immediate", "-w", "stop"],
                true,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_bin() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("initdb"))
            .find(|p| p.is_file())
    });
    // A symlink in PATH may point into the versioned directory, which has pg_ctl beside it.
    let in_path = in_path.and_then(|p| std::fs::canonicalize(p).ok());
    let debian = || {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin").join("initdb")))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    };
    in_path
        .or_else(debian)
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("pg_ctl").is_file())
}

fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    false
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}
