//! How governance is opened: where its store lives and how long it waits, trusts and keeps.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GovConfig {
    /// A SQLite file, or a PostgreSQL URL (`postgres://user:password@host/db`).
    pub db_path: PathBuf,
    /// How long a write waits for another process's lock before failing closed (PostgreSQL:
    /// also the longest wait for a connection and the longest statement).
    pub busy_timeout: Duration,
    /// How long a reservation lives if its request never settles (the process died).
    pub reservation_ttl: Duration,
    /// Recorded in every audit record.
    pub region: Option<String>,
    /// How long a checked key is trusted without asking the store again. Revocations and policy
    /// changes made through this process apply at once; made by another process (the CLI, a
    /// replica), within this time.
    pub auth_cache_ttl: Duration,
}

impl GovConfig {
    pub fn new(db_path: PathBuf) -> Self {
        GovConfig {
            db_path,
            busy_timeout: Duration::from_secs(5),
            reservation_ttl: Duration::from_secs(660),
            region: None,
            auth_cache_ttl: Duration::from_secs(1),
        }
    }
}

/// `$SERRANO_HOME/serrano.db`, else `$XDG_DATA_HOME/serrano/serrano.db`, else
/// `~/.local/share/serrano/serrano.db`.
pub fn default_db_path() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = env("SERRANO_HOME") {
        return home.join("serrano.db");
    }
    let data = env("XDG_DATA_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("serrano").join("serrano.db")
}
