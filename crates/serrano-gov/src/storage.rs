//! The storage trait: everything governance keeps, as operations rather than SQL.
//!
//! [`Governance`](crate::Governance) holds the policy (validation, key caching, compiled
//! filters, bootstrap) and calls a [`Store`] for state. SQLite ([`SqliteStore`](crate::SqliteStore))
//! is the default; PostgreSQL ([`PgStore`](crate::PgStore)) is for gateway replicas on several
//! machines. [`conformance`] is the test every implementation must pass.
//!
//! What every implementation must guarantee (the ledger's and the audit log's invariants live
//! here, not in the caller):
//! - [`Store::reserve`] checks every budget and rate limit of the request and reserves its worst
//!   case atomically: two concurrent reservations can never both pass a limit only one fits.
//!   A request id is reserved at most once ([`GovError::Duplicate`] after).
//! - [`Store::finish`] settles (never charging more than was reserved), appends the audit record
//!   to the hash chain and stores content per retention, all in one transaction, and returns
//!   only once that transaction is durable. The chain is one sequence across every process
//!   sharing the store.
//! - Reservations whose `expires_ms` has passed are released (by the store, on its own).
//! - Errors that mean "the store cannot answer" are [`GovError::Unavailable`], so requests fail
//!   closed with 503.

use async_trait::async_trait;

use crate::audit::{AuditRecord, ChainRow, Retention};
use crate::checkpoint::Checkpoint;
use crate::error::GovError;
use crate::keys::Role;
use crate::rate::RateInfo;
use crate::types::{
    BudgetInfo, BudgetPeriod, BudgetUnit, ChangeRecord, ConfigEvent, ConfigVersion, KeyInfo,
    LedgerState, LimitInfo, Limits, NewChange, TenantInfo, UsageRow,
};

/// A request's worst case, to reserve before it runs.
#[derive(Debug, Clone)]
pub struct ReserveOp {
    pub request_id: String,
    pub tenant_id: i64,
    pub key_id: i64,
    pub model: String,
    pub backend: String,
    /// Other backends the request may fall back to: the worst case is priced at the dearest.
    pub fallbacks: Vec<String>,
    pub prompt_tokens: u64,
    pub max_completion_tokens: u64,
    pub expires_ms: i64,
    /// A tool call (through the MCP gateway): also counted against the tool-call limits.
    pub tool_call: bool,
}

/// What a request actually used.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub request_id: String,
    pub tenant_id: i64,
    pub key_id: i64,
    pub tenant: String,
    pub key_prefix: String,
    pub model: String,
    pub backend: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Prompt and completion text, kept per the tenant's retention.
#[derive(Debug, Clone)]
pub struct Content {
    pub tenant_id: i64,
    pub retention: Retention,
    pub prompt: String,
    pub completion: String,
}

/// The end of a request: its settlement (if it reserved), its audit record (the store fills in
/// `seq`, `time_ms` and `cost_nusd`) and its content.
#[derive(Debug)]
pub struct FinishOp {
    pub settlement: Option<Settlement>,
    pub record: AuditRecord,
    pub content: Option<Content>,
}

/// What a finished request was charged and where its record sits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub seq: u64,
    pub cost_nusd: i64,
}

/// A stored key as authentication needs it: the caller compares hashes in constant time and
/// checks revocation and expiry.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: i64,
    pub hash: Vec<u8>,
    pub prefix: String,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub grant_interactive: bool,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    pub tenant: TenantInfo,
}

/// A key to insert; the secret itself never reaches the store.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub tenant_id: i64,
    pub name: String,
    pub prefix: String,
    pub hash: Vec<u8>,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub grant_interactive: bool,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// A column usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKey {
    Tenant,
    Key,
    Model,
    Day,
    Backend,
}

impl UsageKey {
    pub fn parse(s: &str) -> Option<UsageKey> {
        match s {
            "tenant" => Some(UsageKey::Tenant),
            "key" => Some(UsageKey::Key),
            "model" => Some(UsageKey::Model),
            "day" => Some(UsageKey::Day),
            "backend" => Some(UsageKey::Backend),
            _ => None,
        }
    }
}

/// The chain's last record: (seq, hash).
pub type AuditHead = (i64, String);

/// Records read from the audit chain at a time, by verification and [`Store::audit_chain`]:
/// memory stays a page (a few MB of records) whatever the log's length.
pub const AUDIT_PAGE_RECORDS: i64 = 10_000;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite`, `postgres`: for logs and errors.
    fn kind(&self) -> &'static str;

    // Tenants.
    /// Inserts a tenant; `false` if the name is taken (nothing changes then).
    async fn insert_tenant(
        &self,
        name: &str,
        retention: Retention,
        now_ms: i64,
    ) -> Result<bool, GovError>;
    async fn tenant(&self, name: &str) -> Result<Option<TenantInfo>, GovError>;
    /// All tenants, by id.
    async fn tenants(&self) -> Result<Vec<TenantInfo>, GovError>;
    /// `false` if there is no such tenant. `policy` is validated JSON.
    async fn set_policy(&self, tenant: &str, policy: Option<&str>) -> Result<bool, GovError>;
    /// `false` if there is no such tenant.
    async fn set_retention(&self, tenant: &str, retention: Retention) -> Result<bool, GovError>;

    // Keys.
    /// Every key whose shown prefix is `prefix`, with its tenant.
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<StoredKey>, GovError>;
    async fn key_hash_exists(&self, hash: &[u8]) -> Result<bool, GovError>;
    /// Admin keys not revoked (expired ones count: an operator may still renew them).
    async fn active_admin_keys(&self) -> Result<i64, GovError>;
    /// Returns the new key's id.
    async fn insert_key(&self, key: &KeyRow) -> Result<i64, GovError>;
    /// Keys of one tenant, or of all, by id.
    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, GovError>;
    /// `false` if there is no such key, or it was already revoked.
    async fn revoke_key(&self, id: i64, now_ms: i64) -> Result<bool, GovError>;
    /// The tenant id owning a key, if the key exists.
    async fn key_tenant(&self, id: i64) -> Result<Option<i64>, GovError>;

    // Budgets, limits, prices. `key_id` 0 means the tenant as a whole.
    /// Inserts or replaces; returns the budget's id.
    async fn set_budget(
        &self,
        tenant_id: i64,
        key_id: i64,
        unit: BudgetUnit,
        period: BudgetPeriod,
        limit: i64,
    ) -> Result<i64, GovError>;
    /// Budgets with the spend and reservations of the window `now_ms` falls in, by id.
    async fn budgets(&self, tenant: Option<&str>, now_ms: i64)
        -> Result<Vec<BudgetInfo>, GovError>;
    /// Inserts or replaces; returns the limits' id.
    async fn set_limits(
        &self,
        tenant_id: i64,
        key_id: i64,
        limits: Limits,
    ) -> Result<i64, GovError>;
    async fn limits(&self, tenant: Option<&str>) -> Result<Vec<LimitInfo>, GovError>;
    /// Inserts or replaces, in nano-dollars per token.
    async fn set_price(
        &self,
        model: &str,
        backend: &str,
        input_nusd: i64,
        output_nusd: i64,
    ) -> Result<(), GovError>;
    /// (input, output) nano-dollars per token of a model on a backend, if set.
    async fn price(&self, model: &str, backend: &str) -> Result<Option<(i64, i64)>, GovError>;
    /// Whether there was a price to delete.
    async fn delete_price(&self, model: &str, backend: &str) -> Result<bool, GovError>;

    // The ledger: the request path.
    /// See the module's invariants. `Some` carries the rate-limit state for the headers.
    async fn reserve(&self, op: ReserveOp) -> Result<Option<RateInfo>, GovError>;
    /// See the module's invariants.
    async fn finish(&self, op: FinishOp) -> Result<Finished, GovError>;
    /// Returns once every write started before the call is durable (or has failed).
    async fn flush(&self);
    /// Ledger and audit writes waiting for the store's writer, and how many may wait, where the
    /// store queues them (SQLite's writer thread; PostgreSQL's requests write on their own).
    fn write_queue(&self) -> Option<(usize, usize)>;
    /// Settled usage grouped by the given columns (none: one total row), ordered by them.
    async fn usage(&self, group_by: &[UsageKey]) -> Result<Vec<UsageRow>, GovError>;
    async fn ledger_state(&self) -> Result<LedgerState, GovError>;

    // The audit log.
    /// At most `limit` rows of the chain after `after_seq`, in order, and the recorded head,
    /// read in one snapshot: once a page comes back short, its head must be where the chain
    /// ends (records are only ever appended, so earlier pages stay valid).
    async fn audit_chain_page(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<(Vec<ChainRow>, Option<AuditHead>), GovError>;
    /// The whole chain in order, and the recorded head: it holds every record in memory, so
    /// only for tests and small logs (verification reads [`Store::audit_chain_page`]s).
    async fn audit_chain(&self) -> Result<(Vec<ChainRow>, Option<AuditHead>), GovError> {
        let mut rows: Vec<ChainRow> = Vec::new();
        loop {
            let after = rows.last().map_or(0, |r| r.seq);
            let (page, head) = self.audit_chain_page(after, AUDIT_PAGE_RECORDS).await?;
            let done = (page.len() as i64) < AUDIT_PAGE_RECORDS;
            rows.extend(page);
            if done {
                return Ok((rows, head));
            }
        }
    }
    async fn audit_head(&self) -> Result<Option<AuditHead>, GovError>;
    /// `false` if a checkpoint at that record exists already.
    async fn insert_checkpoint(&self, cp: &Checkpoint) -> Result<bool, GovError>;
    /// By seq.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, GovError>;
    /// Record texts (JSON) after `after_seq`, oldest first, at most `limit`.
    async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<String>, GovError>;
    /// Deletes a tenant's stored content; returns how many records lost it.
    async fn erase_content(&self, tenant_id: i64) -> Result<u64, GovError>;
    /// (retention, prompt, completion) of one record.
    async fn audit_content(
        &self,
        seq: i64,
    ) -> Result<Option<(String, Option<String>, Option<String>)>, GovError>;

    // Routing config versions.
    /// Stores a text once per distinct hash, records the switch; returns the text's version.
    async fn record_config(
        &self,
        hash: &str,
        source: &str,
        author: &str,
        action: &str,
        now_ms: i64,
    ) -> Result<u64, GovError>;
    /// Without their texts, by version.
    async fn config_versions(&self) -> Result<Vec<ConfigVersion>, GovError>;
    async fn config_events(&self) -> Result<Vec<ConfigEvent>, GovError>;
    /// With its text.
    async fn config_version(&self, version: u64) -> Result<Option<ConfigVersion>, GovError>;

    // Admin changes (see `changes.rs`).
    /// Stores a change before it is applied, not yet audited; returns its id.
    async fn insert_change(&self, change: &NewChange<'_>) -> Result<i64, GovError>;
    /// Notes the audit chain record of a change.
    async fn mark_change_audited(&self, id: i64, seq: u64) -> Result<(), GovError>;
    /// Forgets a change that could not be applied (only while it is not audited).
    async fn delete_pending_change(&self, id: i64) -> Result<(), GovError>;
    async fn change(&self, id: i64) -> Result<Option<ChangeRecord>, GovError>;
    /// Changes by id, newest first, at most `limit`: of one kind, and of one target (JSON
    /// text), when given; only those not yet audited and older than `pending_before_ms`,
    /// when that is given.
    async fn changes(&self, filter: ChangeFilter<'_>) -> Result<Vec<ChangeRecord>, GovError>;
}

/// Which changes [`Store::changes`] lists.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChangeFilter<'a> {
    pub kind: Option<&'a str>,
    pub target: Option<&'a str>,
    pub pending_before_ms: Option<i64>,
    pub limit: i64,
}

/// The behaviour every [`Store`] must show, as one test over a fresh, empty store: run it from
/// each implementation's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use crate::audit::{verify_chain, GENESIS};

    /// A request of `prompt` tokens and at most `max` more, on backend `local` with `remote`
    /// as its fallback.
    pub(crate) fn reserve_op(id: &str, tenant_id: i64, prompt: u64, max: u64) -> ReserveOp {
        ReserveOp {
            request_id: id.into(),
            tenant_id,
            key_id: 0,
            model: "m".into(),
            backend: "local".into(),
            fallbacks: vec!["remote".into()],
            prompt_tokens: prompt,
            max_completion_tokens: max,
            expires_ms: crate::now_ms() + 60_000,
            tool_call: false,
        }
    }

    /// The end of a request of `tenant`'s that settles `used` (prompt, completion) if it
    /// reserved, with its content kept per the tenant's retention.
    pub(crate) fn finish_op(id: &str, tenant: &TenantInfo, used: Option<(u64, u64)>) -> FinishOp {
        FinishOp {
            settlement: used.map(|(p, c)| Settlement {
                request_id: id.into(),
                tenant_id: tenant.id,
                key_id: 0,
                tenant: tenant.name.clone(),
                key_prefix: "k".into(),
                model: "m".into(),
                backend: "local".into(),
                prompt_tokens: p,
                completion_tokens: c,
            }),
            record: AuditRecord {
                request_id: id.into(),
                tenant: Some(tenant.name.clone()),
                status: 200,
                ..Default::default()
            },
            content: Some(Content {
                tenant_id: tenant.id,
                retention: tenant.retention,
                prompt: "p".into(),
                completion: "c".into(),
            }),
        }
    }

    pub async fn check(s: &dyn Store) {
        let now = crate::now_ms();
        // Tenants.
        assert!(s.insert_tenant("t", Retention::Full, now).await.unwrap());
        assert!(!s.insert_tenant("t", Retention::None, now).await.unwrap());
        let t = s.tenant("t").await.unwrap().unwrap();
        assert_eq!((t.name.as_str(), t.retention), ("t", Retention::Full));
        assert!(s.tenant("nobody").await.unwrap().is_none());
        assert!(s.set_policy("t", Some("{}")).await.unwrap());
        assert!(!s.set_policy("nobody", None).await.unwrap());
        assert!(!s.set_retention("nobody", Retention::Hash).await.unwrap());
        assert_eq!(s.tenants().await.unwrap().len(), 1);

        // Keys.
        let row = KeyRow {
            tenant_id: t.id,
            name: "ci".into(),
            prefix: "sk-srn-ab".into(),
            hash: vec![7; 32],
            role: Role::Admin,
            models: Some(vec!["m".into()]),
            grant_interactive: true,
            created_ms: now,
            expires_ms: None,
        };
        let id = s.insert_key(&row).await.unwrap();
        assert!(s.key_hash_exists(&[7; 32]).await.unwrap());
        assert!(!s.key_hash_exists(&[8; 32]).await.unwrap());
        assert_eq!(s.active_admin_keys().await.unwrap(), 1);
        let found = s.keys_with_prefix("sk-srn-ab").await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].hash, vec![7; 32]);
        assert!(found[0].grant_interactive);
        assert_eq!(found[0].tenant.policy.as_deref(), Some("{}"));
        assert_eq!(found[0].models, Some(vec!["m".to_string()]));
        assert_eq!(s.key_tenant(id).await.unwrap(), Some(t.id));
        assert!(s.revoke_key(id, now).await.unwrap());
        assert!(!s.revoke_key(id, now).await.unwrap());
        assert_eq!(s.active_admin_keys().await.unwrap(), 0);
        assert_eq!(s.keys(Some("t")).await.unwrap()[0].revoked_ms, Some(now));
        assert!(s.keys(Some("nobody")).await.unwrap().is_empty());

        // A budget of 100 tokens: a reservation of 60 fits, a second does not, a replay is
        // refused; settling 30 leaves room for 70.
        let b = s
            .set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Total, 100)
            .await
            .unwrap();
        let b2 = s
            .set_budget(t.id, 0, BudgetUnit::Tokens, BudgetPeriod::Total, 100)
            .await
            .unwrap();
        assert_eq!(b, b2, "setting a budget again replaces it");
        s.reserve(reserve_op("r1", t.id, 10, 50)).await.unwrap();
        let over = s.reserve(reserve_op("r2", t.id, 10, 50)).await;
        assert!(matches!(over, Err(GovError::OverBudget(_))), "{over:?}");
        let again = s.reserve(reserve_op("r1", t.id, 1, 1)).await;
        assert!(matches!(again, Err(GovError::Duplicate(_))), "{again:?}");
        let state = s.ledger_state().await.unwrap();
        assert_eq!((state.open_requests, state.reserved_total), (1, 60));
        let fin = s.finish(finish_op("r1", &t, Some((10, 20)))).await.unwrap();
        assert_eq!(fin.seq, 1);
        let budgets = s.budgets(Some("t"), now).await.unwrap();
        assert_eq!((budgets[0].spent, budgets[0].reserved), (30, 0));
        s.reserve(reserve_op("r3", t.id, 20, 50)).await.unwrap();
        s.finish(finish_op("r3", &t, Some((20, 0)))).await.unwrap();
        // A refusal is audited without a settlement.
        s.finish(finish_op("r4", &t, None)).await.unwrap();
        s.flush().await;
        let state = s.ledger_state().await.unwrap();
        assert_eq!(
            (state.open_requests, state.reserved_total, state.spent_total),
            (0, 0, 50)
        );

        // Usage, grouped and not.
        let total = s.usage(&[]).await.unwrap();
        assert_eq!(total.len(), 1);
        assert_eq!((total[0].requests, total[0].prompt_tokens), (2, 30));
        let by = s.usage(&[UsageKey::Tenant, UsageKey::Model]).await.unwrap();
        assert_eq!(by[0].tenant.as_deref(), Some("t"));
        assert_eq!(by[0].key, None);
        let by = s.usage(&[UsageKey::Backend]).await.unwrap();
        assert_eq!(by.len(), 1);
        assert_eq!(
            (by[0].backend.as_deref(), by[0].tenant.as_deref()),
            (Some("local"), None)
        );

        // Limits and prices.
        let l = Limits {
            rpm: Some(5),
            tpm: None,
            max_concurrent: Some(2),
            tool_calls_per_minute: Some(3),
            tool_calls_per_day: Some(2),
        };
        s.set_limits(t.id, 0, l).await.unwrap();
        assert_eq!(s.limits(None).await.unwrap()[0].limits, l);
        s.set_price("m", "local", 3, 4).await.unwrap();
        s.set_price("m", "local", 5, 6).await.unwrap();
        assert_eq!(s.price("m", "local").await.unwrap(), Some((5, 6)));
        s.set_price("m", "gone", 1, 1).await.unwrap();
        assert!(s.delete_price("m", "gone").await.unwrap());
        assert!(!s.delete_price("m", "gone").await.unwrap());
        assert_eq!(s.price("m", "gone").await.unwrap(), None);

        // Admin changes: pending until audited, listed newest first, filtered.
        let change = |target: &'static str, after: &'static str| NewChange {
            time_ms: now,
            actor: "cli:root@host",
            action: "set",
            kind: "price",
            target,
            before: "null",
            after,
        };
        let c1 = s.insert_change(&change("{\"m\":1}", "1")).await.unwrap();
        let c2 = s.insert_change(&change("{\"m\":2}", "2")).await.unwrap();
        let c3 = s.insert_change(&change("{\"m\":1}", "3")).await.unwrap();
        assert!(c1 < c2 && c2 < c3);
        s.mark_change_audited(c1, 7).await.unwrap();
        s.delete_pending_change(c1).await.unwrap();
        s.delete_pending_change(c2).await.unwrap();
        let all = |f: ChangeFilter<'static>| async move {
            let ids = s.changes(ChangeFilter { limit: 10, ..f }).await.unwrap();
            ids.iter().map(|c| c.id).collect::<Vec<_>>()
        };
        assert_eq!(
            all(ChangeFilter::default()).await,
            [c3, c1],
            "an audited change stays"
        );
        let one = ChangeFilter {
            target: Some("{\"m\":1}"),
            kind: Some("price"),
            ..Default::default()
        };
        assert_eq!(all(one).await, [c3, c1]);
        let pending = ChangeFilter {
            pending_before_ms: Some(now + 1),
            ..Default::default()
        };
        assert_eq!(all(pending).await, [c3]);
        let stored = s.change(c1).await.unwrap().unwrap();
        assert_eq!(
            (
                stored.audit_seq,
                stored.after.clone(),
                stored.actor.as_str()
            ),
            (Some(7), serde_json::json!(1), "cli:root@host")
        );
        assert_eq!(stored.target, serde_json::json!({"m": 1}));
        assert_eq!(s.change(c2).await.unwrap(), None);
        s.mark_change_audited(c3, 8).await.unwrap();

        // The audit chain: three records, linked, with the head at the last.
        let (rows, head) = s.audit_chain().await.unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].prev_hash, GENESIS);
        assert_eq!(head, s.audit_head().await.unwrap());
        assert_eq!(verify_chain(rows.clone(), head.clone()).unwrap(), 3);
        // The same chain in pages: each one snapshot of its rows and the head.
        let (first, head1) = s.audit_chain_page(0, 2).await.unwrap();
        assert_eq!(first, rows[..2]);
        assert_eq!(head1, head);
        let (rest, head2) = s.audit_chain_page(2, 2).await.unwrap();
        assert_eq!(rest, rows[2..]);
        assert_eq!(head2, head);
        let (none, head3) = s.audit_chain_page(3, 2).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(head3, head);
        let texts = s.audit_records(1, 10).await.unwrap();
        assert_eq!(texts.len(), 2);
        assert!(texts[0].contains("\"r3\""));
        let (seq, hash) = head.unwrap();
        let key = crate::generate_signing_key().0;
        let cp = Checkpoint::sign(&key, seq, &hash, now);
        assert!(s.insert_checkpoint(&cp).await.unwrap());
        assert!(!s.insert_checkpoint(&cp).await.unwrap());
        assert_eq!(s.checkpoints().await.unwrap(), vec![cp]);
        let content = s.audit_content(1).await.unwrap().unwrap();
        assert_eq!(content, ("full".into(), Some("p".into()), Some("c".into())));
        assert_eq!(s.erase_content(t.id).await.unwrap(), 3);
        assert!(s.audit_content(1).await.unwrap().is_none());
        assert_eq!(
            verify_chain(
                s.audit_chain().await.unwrap().0,
                s.audit_head().await.unwrap()
            )
            .unwrap(),
            3
        );

        // Config versions.
        assert_eq!(
            s.record_config("h1", "a", "x", "apply", now).await.unwrap(),
            1
        );
        assert_eq!(
            s.record_config("h2", "b", "x", "apply", now).await.unwrap(),
            2
        );
        assert_eq!(
            s.record_config("h1", "a", "y", "rollback", now)
                .await
                .unwrap(),
            1
        );
        assert_eq!(s.config_versions().await.unwrap().len(), 2);
        assert_eq!(s.config_events().await.unwrap().len(), 3);
        let v = s.config_version(2).await.unwrap().unwrap();
        assert_eq!(v.source.as_deref(), Some("b"));
        assert!(s.config_version(3).await.unwrap().is_none());

        // Tool calls count against the tool-call limits (two a day here); other requests do
        // not, and are not refused by them.
        let call = |id: &str| ReserveOp {
            tool_call: true,
            ..reserve_op(id, t.id, 1, 0)
        };
        for id in ["c1", "c2"] {
            s.reserve(call(id)).await.unwrap();
            s.finish(finish_op(id, &t, Some((1, 0)))).await.unwrap();
        }
        let refused = s.reserve(call("c3")).await.unwrap_err();
        assert!(
            refused.to_string().contains("2 tool calls per day"),
            "{refused}"
        );
        s.reserve(reserve_op("after-calls", t.id, 1, 0))
            .await
            .unwrap();
        s.finish(finish_op("after-calls", &t, Some((1, 0))))
            .await
            .unwrap();
        s.set_limits(t.id, 0, Limits::default()).await.unwrap();
    }
}
