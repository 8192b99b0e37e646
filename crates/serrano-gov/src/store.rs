//! The governance facade: validation, the key cache, compiled filters and bootstrap, over a
//! [`Store`] that keeps the state (SQLite by default, see `sqlite.rs`; PostgreSQL in `pg.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::audit::{AuditRecord, ChainError, ChainVerifier, Retention, VerifyReport};
use crate::checkpoint::Checkpoint;
use crate::config::GovConfig;
use crate::error::GovError;
use crate::keys::{self, Principal, Role};
use crate::metrics::{StoreMetrics, StoreOp};
use crate::pg::{is_postgres_url, PgStore};
use crate::rate::RateInfo;
use crate::sqlite::SqliteStore;
use crate::storage::{FinishOp, Finished, KeyRow, ReserveOp, Store, UsageKey, AUDIT_PAGE_RECORDS};
use crate::time::now_ms;
use crate::types::{BudgetInfo, KeyInfo, LedgerState, LimitInfo, TenantInfo, UsageRow};
use ed25519_dalek::{SigningKey, VerifyingKey};

type AuthCache = std::collections::HashMap<Vec<u8>, (std::time::Instant, Principal, Option<i64>)>;
/// Keys kept in the authentication cache at once.
const MAX_CACHED_KEYS: usize = 10_000;
/// Distinct compiled policies kept at once.
const MAX_CACHED_FILTERS: usize = 256;
/// The tenant that owns the bootstrap admin key.
pub const ADMIN_TENANT: &str = "admin";
/// The tenant of requests without a key, when the server allows anonymous access.
pub const ANONYMOUS_TENANT: &str = "anonymous";
/// Longest tenant name; names are `[A-Za-z0-9._-]`.
pub const MAX_TENANT_CHARS: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant: String,
    pub name: String,
    pub role: Option<Role>,
    pub models: Option<Vec<String>>,
    /// May ask for the interactive latency class though its tenant's class is batch.
    pub grant_interactive: bool,
    pub expires_ms: Option<i64>,
}

impl NewKey {
    /// The admin key made at start-up.
    fn bootstrap() -> NewKey {
        NewKey {
            tenant: ADMIN_TENANT.into(),
            name: "bootstrap".into(),
            role: Some(Role::Admin),
            ..NewKey::default()
        }
    }
}

/// The governance store; cheap to clone.
#[derive(Clone)]
pub struct Governance {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// Recently checked keys by hash: (when checked, principal, key expiry).
    auth_cache: std::sync::Mutex<AuthCache>,
    /// Bumped by every change that may invalidate cached keys.
    auth_generation: std::sync::atomic::AtomicU64,
    /// Compiled safety filters by policy text (bounded: cleared when full).
    filters: std::sync::Mutex<std::collections::HashMap<String, Arc<serrano_safety::Filter>>>,
    metrics: StoreMetrics,
    config: GovConfig,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TENANT_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Governance {
    /// Opens the store `config.db_path` names: a PostgreSQL database if it is a `postgres://`
    /// or `postgresql://` URL, else the SQLite file at that path (created if needed). Applies
    /// migrations and starts the store's background work. Must be called inside a tokio runtime.
    pub async fn open(config: GovConfig) -> Result<Governance, GovError> {
        let store: Arc<dyn Store> = match config.db_path.to_str().filter(|p| is_postgres_url(p)) {
            Some(url) => Arc::new(PgStore::connect(url, &config).await?),
            None => Arc::new(SqliteStore::open(&config).await?),
        };
        Ok(Governance::with_store(store, config))
    }

    /// Governance over any [`Store`] (`config.db_path` and `busy_timeout` were the store's to
    /// use when opening it).
    pub fn with_store(store: Arc<dyn Store>, config: GovConfig) -> Governance {
        let metrics = StoreMetrics::new(store.kind());
        Governance {
            inner: Arc::new(Inner {
                store,
                filters: Default::default(),
                auth_cache: Default::default(),
                auth_generation: Default::default(),
                metrics,
                config,
            }),
        }
    }

    pub fn config(&self) -> &GovConfig {
        &self.inner.config
    }

    pub(crate) fn store(&self) -> &dyn Store {
        &*self.inner.store
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
            if !self.store().key_hash_exists(&keys::hash(key)).await? {
                self.insert_key(&NewKey::bootstrap(), key).await?;
            }
            return Ok(None);
        }
        if self.store().active_admin_keys().await? > 0 {
            return Ok(None);
        }
        let key = keys::generate();
        self.insert_key(&NewKey::bootstrap(), &key).await?;
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
            grant_interactive: false,
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
            grant_interactive: false,
            retention: t.retention,
            filter: self.filter(t.policy.clone()),
        })
    }

    async fn ensure_tenant(&self, name: &str) -> Result<(), GovError> {
        self.store()
            .insert_tenant(name, Retention::default(), now_ms())
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
    pub(crate) fn forget_keys(&self) {
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
        let generation = self
            .inner
            .auth_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let candidates = self.store().keys_with_prefix(prefix).await?;
        let Some(k) = candidates
            .into_iter()
            .find(|k| keys::hashes_equal(&k.hash, hash))
        else {
            return Err(GovError::Unauthorized("Incorrect API key provided.".into()));
        };
        if k.revoked_ms.is_some() {
            return Err(GovError::Unauthorized(
                "This API key has been revoked.".into(),
            ));
        }
        if k.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Err(GovError::Unauthorized("This API key has expired.".into()));
        }
        let p = Principal {
            tenant_id: k.tenant.id,
            tenant: k.tenant.name,
            key_id: k.id,
            key_prefix: k.prefix,
            role: k.role,
            models: k.models,
            grant_interactive: k.grant_interactive,
            retention: k.tenant.retention,
            filter: self.filter(k.tenant.policy),
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
                    (std::time::Instant::now(), p.clone(), k.expires_ms),
                );
            }
        }
        Ok(p)
    }

    pub async fn tenant(&self, name: &str) -> Result<TenantInfo, GovError> {
        self.store()
            .tenant(name)
            .await?
            .ok_or_else(|| GovError::NotFound(format!("tenant '{name}'")))
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
        if !self
            .store()
            .insert_tenant(name, retention, now_ms())
            .await?
        {
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
        if !self.store().set_policy(name, normalized.as_deref()).await? {
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
        if !self.store().set_retention(name, retention).await? {
            return Err(GovError::NotFound(format!("tenant '{name}'")));
        }
        self.forget_keys();
        Ok(())
    }

    pub async fn tenants(&self) -> Result<Vec<TenantInfo>, GovError> {
        self.store().tenants().await
    }

    /// Creates a key; the secret is in the returned string and nowhere else.
    pub async fn create_key(&self, k: NewKey) -> Result<(KeyInfo, String), GovError> {
        if k.models.as_ref().is_some_and(|m| m.is_empty()) {
            return Err(GovError::Invalid(
                "models, if given, must name at least one model".into(),
            ));
        }
        let secret = keys::generate();
        let id = self.insert_key(&k, &secret).await?;
        let info = self
            .keys(Some(&k.tenant))
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| GovError::NotFound(format!("key {id}")))?;
        Ok((info, secret))
    }

    async fn insert_key(&self, k: &NewKey, secret: &str) -> Result<i64, GovError> {
        let t = self.tenant(&k.tenant).await?;
        let prefix =
            keys::shown(secret).ok_or_else(|| GovError::Invalid("key too short".into()))?;
        self.store()
            .insert_key(&KeyRow {
                tenant_id: t.id,
                name: k.name.clone(),
                prefix,
                hash: keys::hash(secret),
                role: k.role.unwrap_or(Role::Inference),
                models: k.models.clone(),
                grant_interactive: k.grant_interactive,
                created_ms: now_ms(),
                expires_ms: k.expires_ms,
            })
            .await
    }

    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, GovError> {
        self.store().keys(tenant).await
    }

    /// Revokes a key at once; its next request is 401.
    pub async fn revoke_key(&self, id: i64) -> Result<(), GovError> {
        if !self.store().revoke_key(id, now_ms()).await? {
            return Err(GovError::NotFound(format!("active key {id}")));
        }
        self.forget_keys();
        Ok(())
    }

    pub async fn limits(&self, tenant: Option<&str>) -> Result<Vec<LimitInfo>, GovError> {
        self.store().limits(tenant).await
    }

    pub(crate) async fn check_key_owner(
        &self,
        t: &TenantInfo,
        key_id: Option<i64>,
    ) -> Result<(), GovError> {
        if let Some(k) = key_id {
            if self.store().key_tenant(k).await? != Some(t.id) {
                return Err(GovError::NotFound(format!(
                    "key {k} of tenant '{}'",
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// Budgets with their current window's spend and reservations.
    pub async fn budgets(&self, tenant: Option<&str>) -> Result<Vec<BudgetInfo>, GovError> {
        self.store().budgets(tenant, now_ms()).await
    }

    /// Sets a model's price on a backend, in dollars per million input and output tokens.
    pub async fn set_price(
        &self,
        model: &str,
        backend: &str,
        input_usd_per_m: f64,
        output_usd_per_m: f64,
    ) -> Result<(), GovError> {
        let (input, output) = crate::nusd_prices(input_usd_per_m, output_usd_per_m)?;
        self.store().set_price(model, backend, input, output).await
    }

    /// Tokens and cost grouped by any of `tenant`, `key`, `model`, `day`.
    pub async fn usage(&self, group_by: &[&str]) -> Result<Vec<UsageRow>, GovError> {
        let keys = group_by
            .iter()
            .map(|g| {
                UsageKey::parse(g).ok_or_else(|| {
                    GovError::Invalid(format!(
                        "cannot group usage by '{g}' (use tenant, key, model, day, backend)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.store().usage(&keys).await
    }

    pub async fn ledger_state(&self) -> Result<LedgerState, GovError> {
        self.store().ledger_state().await
    }

    /// Walks the whole chain and compares its end with the recorded head and every stored
    /// checkpoint.
    pub async fn verify_audit(&self) -> Result<VerifyReport, GovError> {
        self.verify_audit_with(None, &[]).await
    }

    /// As [`Governance::verify_audit`], also requiring checkpoints to be signed by `trusted` and
    /// checking `extra` checkpoints (exported earlier, so an attacker could not delete them).
    /// The chain is read in pages of [`AUDIT_PAGE_RECORDS`], so memory does not grow with it.
    pub async fn verify_audit_with(
        &self,
        trusted: Option<&VerifyingKey>,
        extra: &[Checkpoint],
    ) -> Result<VerifyReport, GovError> {
        self.verify_audit_paged(trusted, extra, AUDIT_PAGE_RECORDS)
            .await
    }

    /// [`Governance::verify_audit_with`] in pages of `page` records (tests use small ones).
    pub(crate) async fn verify_audit_paged(
        &self,
        trusted: Option<&VerifyingKey>,
        extra: &[Checkpoint],
        page: i64,
    ) -> Result<VerifyReport, GovError> {
        // Checkpoints first: each was made at a head that existed then, so the chain read
        // after it must reach it.
        let mut all = self.checkpoints().await?;
        all.extend_from_slice(extra);
        let wanted: HashSet<i64> = all.iter().map(|cp| cp.seq).collect();
        let walk = walk_chain(self.store(), page, &wanted).await?;
        let mut report = VerifyReport {
            records: walk.rows,
            ok: walk.result.is_ok(),
            first_bad_seq: None,
            reason: None,
            head_hash: walk.head_hash,
            checkpoints: 0,
        };
        match walk.result {
            Ok(records) => report.records = records,
            Err(e) => {
                report.first_bad_seq = Some(e.seq);
                report.reason = Some(e.reason);
                return Ok(report);
            }
        }
        for cp in &all {
            let problem = match cp.verify_signature(trusted) {
                Err(e) => Some(e),
                Ok(()) => match walk.at_checkpoints.get(&cp.seq) {
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
        let Some((seq, hash)) = self.store().audit_head().await? else {
            return Ok(None);
        };
        let cp = Checkpoint::sign(key, seq, &hash, now_ms());
        Ok(self.store().insert_checkpoint(&cp).await?.then_some(cp))
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, GovError> {
        self.store().checkpoints().await
    }

    /// Audit records after `after_seq`, oldest first, at most `limit`.
    pub async fn audit_records(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, GovError> {
        self.store()
            .audit_records(after_seq, limit)
            .await?
            .iter()
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
        self.store().erase_content(t.id).await
    }

    /// Stored content of one record: (retention, prompt, completion).
    pub async fn audit_content(
        &self,
        seq: i64,
    ) -> Result<Option<(String, Option<String>, Option<String>)>, GovError> {
        self.store().audit_content(seq).await
    }

    pub(crate) async fn reserve(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError> {
        let started = std::time::Instant::now();
        let r = self.store().reserve(op).await;
        self.inner
            .metrics
            .observe(StoreOp::Reserve, started.elapsed());
        r
    }

    pub(crate) async fn finish(&self, op: FinishOp) -> Result<Finished, GovError> {
        let started = std::time::Instant::now();
        let r = self.store().finish(op).await;
        self.inner
            .metrics
            .observe(StoreOp::Finish, started.elapsed());
        r
    }

    /// Prometheus text of the store's latency (`serrano:gov_store_seconds`), without `# EOF`.
    pub fn encode_metrics(&self) -> String {
        self.inner.metrics.encode(self.store().write_queue())
    }

    /// Prometheus text of each budget's use (`serrano_budget_used_ratio`), without `# EOF`:
    /// read from the store at each scrape.
    pub async fn encode_budget_metrics(&self) -> Result<String, GovError> {
        Ok(crate::metrics::encode_budgets(&self.budgets(None).await?))
    }

    /// Returns once every write queued before the call is committed (or has failed): call at
    /// shutdown so the records of requests cut short are not lost.
    pub async fn flush(&self) {
        self.store().flush().await
    }
}

/// What one pass over the stored chain found.
struct ChainWalk {
    /// Rows stored, whether they verified or not.
    rows: u64,
    /// The records that verified, or where the chain first does not hold.
    result: Result<u64, ChainError>,
    /// The recorded head's hash ("" for an empty log).
    head_hash: String,
    /// The hash of each wanted record (the checkpoints' seqs) among the verified ones.
    at_checkpoints: HashMap<i64, String>,
}

/// Reads the chain in pages of `page` rows, verifying as they come (only the last hash is
/// carried from one page to the next) and keeping the hashes of the `wanted` records only.
/// Rows after the first bad one are still counted, as a report states how many are stored.
async fn walk_chain(
    store: &dyn Store,
    page: i64,
    wanted: &HashSet<i64>,
) -> Result<ChainWalk, GovError> {
    let page = page.max(1);
    let mut verifier = ChainVerifier::new();
    let mut failure = None;
    let (mut rows, mut after) = (0u64, 0i64);
    let mut at_checkpoints = HashMap::new();
    let head = loop {
        let (chunk, head) = store.audit_chain_page(after, page).await?;
        let last_page = (chunk.len() as i64) < page;
        for row in chunk {
            rows += 1;
            after = row.seq;
            if failure.is_some() {
                continue;
            }
            let hash = wanted.contains(&row.seq).then(|| row.hash.clone());
            match verifier.push(row) {
                Ok(()) => {
                    if let Some(h) = hash {
                        at_checkpoints.insert(after, h);
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        if last_page {
            break head;
        }
    };
    let head_hash = head.as_ref().map(|h| h.1.clone()).unwrap_or_default();
    let result = match failure {
        Some(e) => Err(e),
        None => verifier.finish(head),
    };
    Ok(ChainWalk {
        rows,
        result,
        head_hash,
        at_checkpoints,
    })
}

/// Usage rows as CSV with a header; text fields are quoted as RFC 4180 asks.
pub fn usage_csv(rows: &[UsageRow]) -> String {
    let q = |s: &Option<String>| match s {
        Some(s) => format!("\"{}\"", s.replace('"', "\"\"")),
        None => String::new(),
    };
    let mut out = String::from(
        "tenant,key,model,day,backend,requests,prompt_tokens,completion_tokens,cost_usd\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.9}\n",
            q(&r.tenant),
            q(&r.key),
            q(&r.model),
            q(&r.day),
            q(&r.backend),
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_usd
        ));
    }
    out
}

#[cfg(test)]
mod tests;
