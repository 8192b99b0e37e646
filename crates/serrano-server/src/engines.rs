//! The engines this process runs for its `local` backends: the one started with `--model`
//! (backends of `kind = "local"` without a `model`), and one per GGUF path a config names
//! (`kind = "local"`, `model = "PATH"`), loaded when a config first names it and dropped once
//! no applied config does (requests in flight keep theirs until they end).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serrano_engine::EngineHandle;

/// Starts an engine on a GGUF file (blocking: it reads the weights and allocates the KV pool).
pub type Loader = Arc<dyn Fn(&Path) -> Result<EngineHandle, String> + Send + Sync>;

pub struct LocalEngines {
    /// The `--model` engine and the names it is served under.
    default: Option<(EngineHandle, Vec<String>)>,
    loader: Option<Loader>,
    loaded: Mutex<HashMap<PathBuf, EngineHandle>>,
}

impl LocalEngines {
    pub fn new(default: Option<(EngineHandle, Vec<String>)>, loader: Option<Loader>) -> Self {
        LocalEngines {
            default,
            loader,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// No engine at all (a gateway that only forwards).
    pub fn none() -> Self {
        Self::new(None, None)
    }

    /// The `--model` engine and its served names.
    pub fn default_engine(&self) -> Option<&(EngineHandle, Vec<String>)> {
        self.default.as_ref()
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, EngineHandle>> {
        // A map of handles: a panic while holding the lock left nothing half-done.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine for a GGUF path, started on first use off the async workers.
    pub async fn engine_for(&self, path: &Path) -> Result<EngineHandle, String> {
        if let Some(e) = self.loaded().get(path) {
            return Ok(e.clone());
        }
        let loader = self
            .loader
            .clone()
            .ok_or("this process cannot start engines for config models")?;
        let p = path.to_path_buf();
        let engine = tokio::task::spawn_blocking(move || loader(&p))
            .await
            .map_err(|e| format!("the engine loader failed: {e}"))??;
        // Two applies loading the same path at once keep the first engine.
        Ok(self
            .loaded()
            .entry(path.to_path_buf())
            .or_insert(engine)
            .clone())
    }

    /// Forgets the engines of paths no applied config names any more.
    pub fn retain(&self, paths: &[PathBuf]) {
        self.loaded().retain(|p, _| paths.contains(p));
    }
}
