//! The governance store: SQLite (WAL, `synchronous=FULL`) opened once per process, a read pool
//! for lookups and reports, and the single writer task for ledger and audit writes.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::oneshot;

use crate::audit::{verify_chain, AuditRecord, ChainRow, Retention, VerifyReport};
use crate::checkpoint::Checkpoint;
use crate::error::GovError;
use crate::keys::{self, Principal, Role};
use crate::ledger::{BudgetPeriod, BudgetUnit, ReserveOp};
use crate::rate::RateInfo;
use crate::time::now_ms;
use crate::writer::{self, FinishOp, Finished, Op};
use ed25519_dalek::{SigningKey, VerifyingKey};

type AuthCache = std::collections::HashMap<Vec<u8>, (std::time::Instant, Principal, Option<i64>)>;
/// Keys kept in the authentication cache at once.
const MAX_CACHED_KEYS: usize = 10_000;
/// Distinct compiled policies kept at once.
const MAX_CACHED_FILTERS: usize = 256;
/// Ledger and audit writes that may wait for the writer; past it, callers wait (backpressure).
const WRITER_QUEUE: usize = 4096;
/// The tenant that owns the bootstrap admin key.
pub const ADMIN_TENANT: &str = "admin";
/// The tenant of requests without a key, when the server allows anonymous access.
pub const ANONYMOUS_TENANT: &str = "anonymous";
/// Longest tenant name; names are `[A-Za-z0-9._-]`.
pub const MAX_TENANT_CHARS: usize = 64;

#[derive(Debug, Clone)]
pub struct GovConfig {
    pub db_path: PathBuf,
    /// How long a write waits for another process's lock before failing closed.
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

#[derive(Debug, Clone, Serialize)]
pub struct TenantInfo {
    pub id: i64,
    pub name: String,
    pub retention: Retention,
    pub created_ms: i64,
    /// The safety-filter policy as JSON, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub tenant: String,
    pub name: String,
    pub prefix: String,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant: String,
    pub name: String,
    pub role: Option<Role>,
    pub models: Option<Vec<String>>,
    pub expires_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetInfo {
    pub id: i64,
    pub tenant: String,
    /// 0 for a tenant-wide budget.
    pub key_id: i64,
    pub unit: BudgetUnit,
    pub period: BudgetPeriod,
    /// Tokens, or nano-dollars for `usd`.
    pub limit: i64,
    /// In the current window.
    pub spent: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

/// Rate limits of a tenant or key; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Limits {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LimitInfo {
    pub id: i64,
    pub tenant: String,
    pub key_id: i64,
    #[serde(flatten)]
    pub limits: Limits,
}

/// Open reservations, for operators and tests ("every outcome leaves reservations at zero").
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LedgerState {
    pub open_requests: i64,
    pub reserved_total: i64,
    pub spent_total: i64,
}

/// The governance store; cheap to clone.
#[derive(Clone)]
pub struct Governance {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    /// Recently checked keys by hash: (when checked, principal, key expiry).
    auth_cache: std::sync::Mutex<AuthCache>,
    /// Bumped by every change that may invalidate cached keys.
    auth_generation: std::sync::atomic::AtomicU64,
    /// Compiled safety filters by policy text (bounded: cleared when full).
    filters: std::sync::Mutex<std::collections::HashMap<String, Arc<serrano_safety::Filter>>>,
    writer: flume::Sender<Op>,
    config: GovConfig,
}

/// The schema's versions, in order; a version, once released, never changes (sqlx checks its
/// checksum).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "governance",
        include_str!("../migrations/0001_governance.sql"),
    ),
    (
        2,
        "rate limits",
        include_str!("../migrations/0002_rate_limits.sql"),
    ),
    (
        3,
        "audit checkpoints",
        include_str!("../migrations/0003_checkpoints.sql"),
    ),
    (
        4,
        "safety policies",
        include_str!("../migrations/0004_policies.sql"),
    ),
    (
        5,
        "config versions",
        include_str!("../migrations/0005_config_versions.sql"),
    ),
];

fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, name, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(name),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TENANT_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Governance {
    /// Opens (creating if needed) the database, applies migrations and starts the writer.
    /// Must be called inside a tokio runtime.
    pub async fn open(config: GovConfig) -> Result<Governance, GovError> {
        if let Some(dir) = config
            .db_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                GovError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(&config.db_path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.busy_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(config.busy_timeout.max(Duration::from_secs(1)))
            .connect_with(opts.clone())
            .await?;
        migrator().run(&pool).await?;
        restrict_permissions(&config.db_path);
        let conn = writer_connection(&config)?;
        // The WAL holds the same data as the database until a checkpoint.
        for suffix in ["-wal", "-shm"] {
            let mut p = config.db_path.clone().into_os_string();
            p.push(suffix);
            restrict_permissions(Path::new(&p));
        }
        let (tx, rx) = flume::bounded(WRITER_QUEUE);
        std::thread::Builder::new()
            .name("serrano-gov-writer".into())
            .spawn(move || writer::run(conn, rx))
            .map_err(|e| GovError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(Governance {
            inner: Arc::new(Inner {
                pool,
                filters: Default::default(),
                auth_cache: Default::default(),
                auth_generation: Default::default(),
                writer: tx,
                config,
            }),
        })
    }

    pub fn config(&self) -> &GovConfig {
        &self.inner.config
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// Makes sure an admin key exists. With `master`, that key (an operator-chosen secret of at
    /// least 32 characters) is registered if new; without it, and with no admin key at all, one
    /// is generated and returned so the caller can show it once.
    pub async fn bootstrap(&self, master: Option<&str>) -> Result<Option<String>, GovError> {
        self.ensure_tenant(ADMIN_TENANT).await?;
        if let Some(key) = master {
            if keys::shown(key).is_none() {
                return Err(GovError::Invalid(format!(
                    "the admin key must be {} to {} ASCII characters",
                    keys::MIN_KEY_CHARS,
                    keys::MAX_KEY_CHARS
                )));
            }
            let known: Option<i64> = sqlx::query_scalar("SELECT id FROM api_keys WHERE hash = ?1")
                .bind(keys::hash(key))
                .fetch_optional(self.pool())
                .await?;
            if known.is_none() {
                self.insert_key(ADMIN_TENANT, "bootstrap", key, Role::Admin, None, None)
                    .await?;
            }
            return Ok(None);
        }
        let admins: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE role = 'admin' AND revoked_ms IS NULL",
        )
        .fetch_one(self.pool())
        .await?;
        if admins > 0 {
            return Ok(None);
        }
        let key = keys::generate();
        self.insert_key(ADMIN_TENANT, "bootstrap", &key, Role::Admin, None, None)
            .await?;
        Ok(Some(key))
    }

    /// The principal of requests without a key when anonymous access is on: the tenant
    /// [`ANONYMOUS_TENANT`] (created if missing), inference only, no key (budgets of the tenant
    /// still apply, and every request is still audited).
    pub async fn anonymous(&self) -> Result<Principal, GovError> {
        self.ensure_tenant(ANONYMOUS_TENANT).await?;
        let t = self.tenant(ANONYMOUS_TENANT).await?;
        Ok(Principal {
            tenant_id: t.id,
            tenant: t.name,
            key_id: 0,
            key_prefix: ANONYMOUS_TENANT.into(),
            role: Role::Inference,
            models: None,
            retention: t.retention,
            filter: self.filter(t.policy.clone()),
        })
    }

    /// The principal of a verified JWT: its tenant must exist (403 otherwise); it may infer with
    /// any model, and is recorded as `jwt:SUBJECT`. Only the tenant's budgets and limits apply.
    pub async fn jwt_principal(&self, id: &crate::JwtIdentity) -> Result<Principal, GovError> {
        let t = self.tenant(&id.tenant).await.map_err(|_| {
            GovError::Forbidden(format!(
                "The token's tenant '{}' is not known here.",
                id.tenant
            ))
        })?;
        Ok(Principal {
            tenant_id: t.id,
            tenant: t.name,
            key_id: 0,
            key_prefix: format!("jwt:{}", id.subject),
            role: Role::Inference,
            models: None,
            retention: t.retention,
            filter: self.filter(t.policy.clone()),
        })
    }

    async fn ensure_tenant(&self, name: &str) -> Result<(), GovError> {
        sqlx::query(
            "INSERT INTO tenants (name, created_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Checks a bearer key: unknown, revoked and expired keys are all 401.
    pub async fn authenticate(&self, key: &str) -> Result<Principal, GovError> {
        let invalid = || GovError::Unauthorized("Incorrect API key provided.".into());
        let prefix = keys::shown(key).ok_or_else(invalid)?;
        let hash = keys::hash(key);
        if let Some(p) = self.cached(&hash) {
            return Ok(p);
        }
        self.authenticate_in_store(&prefix, &hash).await
    }

    fn cached(&self, hash: &[u8]) -> Option<Principal> {
        let cache = self
            .inner
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (at, p, expires) = cache.get(hash)?;
        let fresh =
            at.elapsed() < self.inner.config.auth_cache_ttl && expires.is_none_or(|e| e > now_ms());
        fresh.then(|| p.clone())
    }

    /// Forgets every checked key, after a change that may affect them. The generation bump
    /// keeps a lookup that started before the change from caching what it read.
    fn forget_keys(&self) {
        let mut cache = self
            .inner
            .auth_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner
            .auth_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.clear();
    }

    async fn authenticate_in_store(
        &self,
        prefix: &str,
        hash: &[u8],
    ) -> Result<Principal, GovError> {
        let invalid = || GovError::Unauthorized("Incorrect API key provided.".into());
        let generation = self
            .inner
            .auth_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let rows = sqlx::query(
            "SELECT k.id, k.hash, k.prefix, k.role, k.models, k.expires_ms, k.revoked_ms,
                    t.id AS tenant_id, t.name AS tenant, t.retention, t.policy
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = ?1",
        )
        .bind(prefix)
        .fetch_all(self.pool())
        .await?;
        for r in rows {
            let stored: Vec<u8> = r.try_get("hash")?;
            if !keys::hashes_equal(&stored, hash) {
                continue;
            }
            if r.try_get::<Option<i64>, _>("revoked_ms")?.is_some() {
                return Err(GovError::Unauthorized(
                    "This API key has been revoked.".into(),
                ));
            }
            let expires: Option<i64> = r.try_get("expires_ms")?;
            if expires.is_some_and(|e| e <= now_ms()) {
                return Err(GovError::Unauthorized("This API key has expired.".into()));
            }
            let p = Principal {
                tenant_id: r.try_get("tenant_id")?,
                tenant: r.try_get("tenant")?,
                key_id: r.try_get("id")?,
                key_prefix: r.try_get("prefix")?,
                role: Role::parse(r.try_get("role")?).unwrap_or(Role::Inference),
                models: parse_models(r.try_get("models")?),
                retention: Retention::parse(r.try_get("retention")?).unwrap_or_default(),
                filter: self.filter(r.try_get("policy")?),
            };
            if !self.inner.config.auth_cache_ttl.is_zero() {
                let mut cache = self
                    .inner
                    .auth_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let current = self
                    .inner
                    .auth_generation
                    .load(std::sync::atomic::Ordering::SeqCst);
                if current == generation {
                    if cache.len() >= MAX_CACHED_KEYS {
                        cache.clear();
                    }
                    cache.insert(
                        hash.to_vec(),
                        (std::time::Instant::now(), p.clone(), expires),
                    );
                }
            }
            return Ok(p);
        }
        Err(invalid())
    }

    pub async fn tenant(&self, name: &str) -> Result<TenantInfo, GovError> {
        let r = sqlx::query(
            "SELECT id, name, retention, created_ms, policy FROM tenants WHERE name = ?1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| GovError::NotFound(format!("tenant '{name}'")))?;
        tenant_row(&r)
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<TenantInfo, GovError> {
        if !valid_name(name) {
            return Err(GovError::Invalid(format!(
                "a tenant name must be 1 to {MAX_TENANT_CHARS} characters of [A-Za-z0-9._-]"
            )));
        }
        let done = sqlx::query(
            "INSERT INTO tenants (name, retention, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(retention.as_str())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(GovError::Invalid(format!("tenant '{name}' already exists")));
        }
        self.tenant(name).await
    }

    /// Sets (or, with `None`, removes) a tenant's safety-filter policy; the JSON is validated.
    pub async fn set_policy(&self, name: &str, policy: Option<&str>) -> Result<(), GovError> {
        let normalized = match policy {
            Some(json) => {
                let p = serrano_safety::Policy::from_json(json)
                    .map_err(|e| GovError::Invalid(format!("invalid policy: {e}")))?;
                Some(serde_json::to_string(&p).map_err(|e| GovError::Invalid(e.to_string()))?)
            }
            None => None,
        };
        let n = sqlx::query("UPDATE tenants SET policy = ?2 WHERE name = ?1")
            .bind(name)
            .bind(normalized)
            .execute(self.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(GovError::NotFound(format!("tenant '{name}'")));
        }
        self.forget_keys();
        Ok(())
    }

    /// The compiled filter of a policy, built once per distinct policy text.
    pub fn filter(&self, policy: Option<String>) -> Option<Arc<serrano_safety::Filter>> {
        let json = policy?;
        let mut cache = self.inner.filters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&json) {
            return Some(f.clone());
        }
        let f = serrano_safety::Policy::from_json(&json)
            .and_then(serrano_safety::Filter::new)
            .map_err(|e| tracing::error!("a stored policy does not load: {e}"))
            .ok()?;
        if cache.len() >= MAX_CACHED_FILTERS {
            cache.clear();
        }
        let f = Arc::new(f);
        cache.insert(json, f.clone());
        Some(f)
    }

    pub async fn set_retention(&self, name: &str, retention: Retention) -> Result<(), GovError> {
        let n = sqlx::query("UPDATE tenants SET retention = ?2 WHERE name = ?1")
            .bind(name)
            .bind(retention.as_str())
            .execute(self.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(GovError::NotFound(format!("tenant '{name}'")));
        }
        self.forget_keys();
        Ok(())
    }

    pub async fn tenants(&self) -> Result<Vec<TenantInfo>, GovError> {
        let rows =
            sqlx::query("SELECT id, name, retention, created_ms, policy FROM tenants ORDER BY id")
                .fetch_all(self.pool())
                .await?;
        rows.iter().map(tenant_row).collect()
    }

    /// Creates a key; the secret is in the returned string and nowhere else.
    pub async fn create_key(&self, k: NewKey) -> Result<(KeyInfo, String), GovError> {
        if k.models.as_ref().is_some_and(|m| m.is_empty()) {
            return Err(GovError::Invalid(
                "models, if given, must name at least one model".into(),
            ));
        }
        let secret = keys::generate();
        let id = self
            .insert_key(
                &k.tenant,
                &k.name,
                &secret,
                k.role.unwrap_or(Role::Inference),
                k.models,
                k.expires_ms,
            )
            .await?;
        let info = self
            .keys(None)
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| GovError::NotFound(format!("key {id}")))?;
        Ok((info, secret))
    }

    async fn insert_key(
        &self,
        tenant: &str,
        name: &str,
        secret: &str,
        role: Role,
        models: Option<Vec<String>>,
        expires_ms: Option<i64>,
    ) -> Result<i64, GovError> {
        let t = self.tenant(tenant).await?;
        let prefix =
            keys::shown(secret).ok_or_else(|| GovError::Invalid("key too short".into()))?;
        let models = models.map(|m| serde_json::to_string(&m).unwrap_or_default());
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (tenant_id, name, prefix, hash, role, models, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        )
        .bind(t.id)
        .bind(name)
        .bind(prefix)
        .bind(keys::hash(secret))
        .bind(role.as_str())
        .bind(models)
        .bind(now_ms())
        .bind(expires_ms)
        .fetch_one(self.pool())
        .await?;
        Ok(id)
    }

    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT k.id, t.name AS tenant, k.name, k.prefix, k.role, k.models, k.created_ms,
                    k.expires_ms, k.revoked_ms
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY k.id",
        )
        .bind(tenant)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    name: r.try_get("name")?,
                    prefix: r.try_get("prefix")?,
                    role: Role::parse(r.try_get("role")?).unwrap_or(Role::Inference),
                    models: parse_models(r.try_get("models")?),
                    created_ms: r.try_get("created_ms")?,
                    expires_ms: r.try_get("expires_ms")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                })
            })
            .collect()
    }

    /// Revokes a key at once; its next request is 401.
    pub async fn revoke_key(&self, id: i64) -> Result<(), GovError> {
        let n =
            sqlx::query("UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL")
                .bind(id)
                .bind(now_ms())
                .execute(self.pool())
                .await?
                .rows_affected();
        if n == 0 {
            return Err(GovError::NotFound(format!("active key {id}")));
        }
        self.forget_keys();
        Ok(())
    }

    /// Sets (or replaces) a budget of a tenant, or of one of its keys; `limit` is in tokens, or
    /// in nano-dollars for `usd`.
    pub async fn set_budget(
        &self,
        tenant: &str,
        key_id: Option<i64>,
        unit: BudgetUnit,
        period: BudgetPeriod,
        limit: i64,
    ) -> Result<i64, GovError> {
        if limit < 0 {
            return Err(GovError::Invalid(
                "a budget limit cannot be negative".into(),
            ));
        }
        let t = self.tenant(tenant).await?;
        self.check_key_owner(&t, tenant, key_id).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO budgets (tenant_id, key_id, unit, period, limit_amount) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant_id, key_id, unit, period) DO UPDATE SET limit_amount = excluded.limit_amount
             RETURNING id",
        )
        .bind(t.id)
        .bind(key_id.unwrap_or(0))
        .bind(unit.as_str())
        .bind(period.as_str())
        .bind(limit)
        .fetch_one(self.pool())
        .await?;
        Ok(id)
    }

    /// Sets (or replaces) the rate limits of a tenant, or of one of its keys; `None` means no
    /// limit of that kind.
    pub async fn set_limits(
        &self,
        tenant: &str,
        key_id: Option<i64>,
        l: Limits,
    ) -> Result<i64, GovError> {
        if [l.rpm, l.tpm, l.max_concurrent]
            .iter()
            .flatten()
            .any(|v| *v < 0)
        {
            return Err(GovError::Invalid("limits cannot be negative".into()));
        }
        let t = self.tenant(tenant).await?;
        self.check_key_owner(&t, tenant, key_id).await?;
        Ok(sqlx::query_scalar(
            "INSERT INTO limits (tenant_id, key_id, rpm, tpm, max_concurrent) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant_id, key_id) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm,
                 max_concurrent = excluded.max_concurrent
             RETURNING id",
        )
        .bind(t.id)
        .bind(key_id.unwrap_or(0))
        .bind(l.rpm)
        .bind(l.tpm)
        .bind(l.max_concurrent)
        .fetch_one(self.pool())
        .await?)
    }

    pub async fn limits(&self, tenant: Option<&str>) -> Result<Vec<LimitInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT l.id, t.name AS tenant, l.key_id, l.rpm, l.tpm, l.max_concurrent
             FROM limits l JOIN tenants t ON t.id = l.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY l.id",
        )
        .bind(tenant)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LimitInfo {
                    id: r.try_get("id")?,
                    tenant: r.try_get("tenant")?,
                    key_id: r.try_get("key_id")?,
                    limits: Limits {
                        rpm: r.try_get("rpm")?,
                        tpm: r.try_get("tpm")?,
                        max_concurrent: r.try_get("max_concurrent")?,
                    },
                })
            })
            .collect()
    }

    async fn check_key_owner(
        &self,
        t: &TenantInfo,
        tenant: &str,
        key_id: Option<i64>,
    ) -> Result<(), GovError> {
        if let Some(k) = key_id {
            let owner: Option<i64> =
                sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE id = ?1")
                    .bind(k)
                    .fetch_optional(self.pool())
                    .await?;
            if owner != Some(t.id) {
                return Err(GovError::NotFound(format!("key {k} of tenant '{tenant}'")));
            }
        }
        Ok(())
    }

    /// Budgets with their current window's spend and reservations.
    pub async fn budgets(&self, tenant: Option<&str>) -> Result<Vec<BudgetInfo>, GovError> {
        let rows = sqlx::query(
            "SELECT b.id, t.name AS tenant, b.key_id, b.unit, b.period, b.limit_amount
             FROM budgets b JOIN tenants t ON t.id = b.tenant_id
             WHERE ?1 IS NULL OR t.name = ?1 ORDER BY b.id",
        )
        .bind(tenant)
        .fetch_all(self.pool())
        .await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get("id")?;
            let period = BudgetPeriod::parse(r.try_get("period")?).unwrap_or(BudgetPeriod::Total);
            let usage = sqlx::query(
                "SELECT spent, reserved FROM budget_usage WHERE budget_id = ?1 AND period_key = ?2",
            )
            .bind(id)
            .bind(period.key(now))
            .fetch_optional(self.pool())
            .await?;
            let (spent, reserved) = match usage {
                Some(u) => (u.try_get(0)?, u.try_get(1)?),
                None => (0, 0),
            };
            out.push(BudgetInfo {
                id,
                tenant: r.try_get("tenant")?,
                key_id: r.try_get("key_id")?,
                unit: BudgetUnit::parse(r.try_get("unit")?).unwrap_or(BudgetUnit::Tokens),
                period,
                limit: r.try_get("limit_amount")?,
                spent,
                reserved,
            });
        }
        Ok(out)
    }

    /// Sets a model's price on a backend, in dollars per million input and output tokens.
    pub async fn set_price(
        &self,
        model: &str,
        backend: &str,
        input_usd_per_m: f64,
        output_usd_per_m: f64,
    ) -> Result<(), GovError> {
        let ok = |p: f64| (0.0..1e6).contains(&p);
        if !ok(input_usd_per_m) || !ok(output_usd_per_m) {
            return Err(GovError::Invalid(
                "prices must be between 0 and 1,000,000 dollars per million tokens".into(),
            ));
        }
        sqlx::query(
            "INSERT INTO prices (model, backend, input_nusd, output_nusd) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (model, backend) DO UPDATE SET input_nusd = excluded.input_nusd, output_nusd = excluded.output_nusd",
        )
        .bind(model)
        .bind(backend)
        .bind(crate::nusd_per_token(input_usd_per_m))
        .bind(crate::nusd_per_token(output_usd_per_m))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Tokens and cost grouped by any of `tenant`, `key`, `model`, `day`.
    pub async fn usage(&self, group_by: &[&str]) -> Result<Vec<UsageRow>, GovError> {
        let mut cols = vec![];
        for g in group_by {
            let col = match *g {
                "tenant" => "tenant",
                "key" => "key_prefix",
                "model" => "model",
                "day" => "day",
                other => {
                    return Err(GovError::Invalid(format!(
                        "cannot group usage by '{other}' (use tenant, key, model, day)"
                    )))
                }
            };
            if !cols.contains(&col) {
                cols.push(col);
            }
        }
        let select = |c: &str| {
            if cols.contains(&c) {
                c.to_string()
            } else {
                format!("NULL AS {c}")
            }
        };
        let group = if cols.is_empty() {
            String::new()
        } else {
            format!("GROUP BY {0} ORDER BY {0}", cols.join(", "))
        };
        // Column names come from the fixed list above, never from the caller.
        let sql = format!(
            "SELECT {}, {}, {}, {}, COUNT(*) AS requests, COALESCE(SUM(prompt_tokens), 0) AS p,
                    COALESCE(SUM(completion_tokens), 0) AS c, COALESCE(SUM(cost_nusd), 0) AS cost
             FROM usage {group}",
            select("tenant"),
            select("key_prefix"),
            select("model"),
            select("day"),
        );
        let rows = sqlx::query(&sql).fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    tenant: r.try_get("tenant")?,
                    key: r.try_get("key_prefix")?,
                    model: r.try_get("model")?,
                    day: r.try_get("day")?,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("p")?,
                    completion_tokens: r.try_get("c")?,
                    cost_usd: r.try_get::<i64, _>("cost")? as f64 / crate::NUSD_PER_USD,
                })
            })
            .collect()
    }

    pub async fn ledger_state(&self) -> Result<LedgerState, GovError> {
        let open: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM requests WHERE state = 'reserved'")
                .fetch_one(self.pool())
                .await?;
        let r = sqlx::query(
            "SELECT COALESCE(SUM(reserved), 0), COALESCE(SUM(spent), 0) FROM budget_usage",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(LedgerState {
            open_requests: open,
            reserved_total: r.try_get(0)?,
            spent_total: r.try_get(1)?,
        })
    }

    /// Walks the whole chain and compares its end with the recorded head and every stored
    /// checkpoint.
    pub async fn verify_audit(&self) -> Result<VerifyReport, GovError> {
        self.verify_audit_with(None, &[]).await
    }

    /// As [`Governance::verify_audit`], also requiring checkpoints to be signed by `trusted` and
    /// checking `extra` checkpoints (exported earlier, so an attacker could not delete them).
    pub async fn verify_audit_with(
        &self,
        trusted: Option<&VerifyingKey>,
        extra: &[Checkpoint],
    ) -> Result<VerifyReport, GovError> {
        let rows = sqlx::query("SELECT seq, record, prev_hash, hash FROM audit_log ORDER BY seq")
            .fetch_all(self.pool())
            .await?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(ChainRow {
                    seq: r.try_get(0)?,
                    record: r.try_get(1)?,
                    prev_hash: r.try_get(2)?,
                    hash: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(self.pool())
            .await?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get::<i64, _>(0)?, r.try_get::<String, _>(1)?)))
            .transpose()?;
        let head_hash = head.as_ref().map(|h| h.1.clone()).unwrap_or_default();
        let hashes: Vec<String> = rows.iter().map(|r| r.hash.clone()).collect();
        let n = rows.len() as u64;
        let mut report = match verify_chain(rows, head) {
            Ok(records) => VerifyReport {
                records,
                ok: true,
                first_bad_seq: None,
                reason: None,
                head_hash,
                checkpoints: 0,
            },
            Err(e) => VerifyReport {
                records: n,
                ok: false,
                first_bad_seq: Some(e.seq),
                reason: Some(e.reason),
                head_hash,
                checkpoints: 0,
            },
        };
        if !report.ok {
            return Ok(report);
        }
        let mut all = self.checkpoints().await?;
        all.extend_from_slice(extra);
        for cp in &all {
            let problem = match cp.verify_signature(trusted) {
                Err(e) => Some(e),
                Ok(()) => match usize::try_from(cp.seq - 1).ok().and_then(|i| hashes.get(i)) {
                    None => Some("its record is missing (the chain was truncated)".into()),
                    Some(h) if *h != cp.hash => {
                        Some("the chain at its record differs from what was signed".into())
                    }
                    Some(_) => None,
                },
            };
            if let Some(p) = problem {
                report.ok = false;
                report.first_bad_seq = Some(cp.seq);
                report.reason = Some(format!("checkpoint at record {}: {p}", cp.seq));
                return Ok(report);
            }
            report.checkpoints += 1;
        }
        Ok(report)
    }

    /// Signs the chain's current head, unless it is empty or already signed. Returns the
    /// checkpoint made, if any.
    pub async fn checkpoint(&self, key: &SigningKey) -> Result<Option<Checkpoint>, GovError> {
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(self.pool())
            .await?;
        let Some(head) = head else { return Ok(None) };
        let (seq, hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
        let cp = Checkpoint::sign(key, seq, &hash, now_ms());
        let n = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, public_key, signature)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )
        .bind(cp.seq)
        .bind(&cp.hash)
        .bind(cp.time_ms)
        .bind(&cp.public_key)
        .bind(&cp.signature)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok((n == 1).then_some(cp))
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, GovError> {
        let rows = sqlx::query(
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    seq: r.try_get(0)?,
                    hash: r.try_get(1)?,
                    time_ms: r.try_get(2)?,
                    public_key: r.try_get(3)?,
                    signature: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Audit records after `after_seq`, oldest first, at most `limit`.
    pub async fn audit_records(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, GovError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT record FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .bind(after_seq)
                .bind(limit)
                .fetch_all(self.pool())
                .await?;
        rows.iter()
            .map(|t| {
                serde_json::from_str(t).map_err(|e| {
                    GovError::Unavailable(format!("an audit record does not parse: {e}"))
                })
            })
            .collect()
    }

    /// Removes every stored prompt and completion of a tenant (GDPR erasure); the chain, which
    /// never contained them, still verifies. Returns how many records lost their content.
    pub async fn erase_content(&self, tenant: &str) -> Result<u64, GovError> {
        let t = self.tenant(tenant).await?;
        Ok(
            sqlx::query("DELETE FROM audit_content WHERE tenant_id = ?1")
                .bind(t.id)
                .execute(self.pool())
                .await?
                .rows_affected(),
        )
    }

    /// Stored content of one record: (retention, prompt, completion).
    pub async fn audit_content(
        &self,
        seq: i64,
    ) -> Result<Option<(String, Option<String>, Option<String>)>, GovError> {
        let r =
            sqlx::query("SELECT retention, prompt, completion FROM audit_content WHERE seq = ?1")
                .bind(seq)
                .fetch_optional(self.pool())
                .await?;
        r.map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .transpose()
    }

    pub(crate) async fn reserve(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Reserve(op, tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    pub(crate) async fn finish(&self, op: FinishOp) -> Result<Finished, GovError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Finish(Box::new(op), tx)).await?;
        rx.await.map_err(|_| gone())?
    }

    /// Returns once every write queued before the call is committed (or has failed): call at
    /// shutdown so the records of requests cut short are not lost.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn send(&self, op: Op) -> Result<(), GovError> {
        self.inner.writer.send_async(op).await.map_err(|_| gone())
    }
}

/// The writer's own connection, with the same settings as the pool's.
fn writer_connection(config: &GovConfig) -> Result<rusqlite::Connection, GovError> {
    let conn = rusqlite::Connection::open(&config.db_path)?;
    conn.busy_timeout(config.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn gone() -> GovError {
    GovError::Unavailable("the store writer has stopped".into())
}

fn tenant_row(r: &sqlx::sqlite::SqliteRow) -> Result<TenantInfo, GovError> {
    Ok(TenantInfo {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        retention: Retention::parse(r.try_get("retention")?).unwrap_or_default(),
        created_ms: r.try_get("created_ms")?,
        policy: r.try_get("policy")?,
    })
}

fn parse_models(s: Option<String>) -> Option<Vec<String>> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

/// The database holds key hashes and audit content: readable by its owner only.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("cannot restrict {}: {e}", path.display());
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Usage rows as CSV with a header; text fields are quoted as RFC 4180 asks.
pub fn usage_csv(rows: &[UsageRow]) -> String {
    let q = |s: &Option<String>| match s {
        Some(s) => format!("\"{}\"", s.replace('"', "\"\"")),
        None => String::new(),
    };
    let mut out =
        String::from("tenant,key,model,day,requests,prompt_tokens,completion_tokens,cost_usd\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{:.9}\n",
            q(&r.tenant),
            q(&r.key),
            q(&r.model),
            q(&r.day),
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_usd
        ));
    }
    out
}
