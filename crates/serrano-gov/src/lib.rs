//! serrano's governance layer: who is asking (tenants, API keys, scopes), what they may spend
//! (budgets kept as a ledger of reservations and settlements), and what happened (a hash-chained,
//! durable audit log). State lives behind the [`Store`] trait: SQLite ([`SqliteStore`], through
//! `sqlx` and one `rusqlite` writer thread) by default; PostgreSQL ([`PgStore`], through `sqlx`)
//! for replicas on several machines sharing one database.
//!
//! Invariants:
//! - A key is stored only as its sha256; the secret is returned once, at creation.
//! - Budget checks and reservations happen in one write transaction, so concurrent requests can
//!   never reserve past a limit; settlement replaces a reservation by the actual usage (never more
//!   than reserved) in the same transaction as the request's audit record.
//! - An audit record is answered only once it is durable (SQLite: its WAL fsynced by the one
//!   writer, which group-commits; PostgreSQL: its transaction committed), so it is on disk
//!   before the response completes.

mod audit;
mod budget;
mod changes;
mod checkpoint;
mod config;
mod error;
mod jwt;
mod keys;
mod ledger;
mod metrics;
mod pg;
/// A private PostgreSQL server, for this crate's tests and, through the `testing` feature,
/// other crates'.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod pgtest;
mod rate;
mod sql;
mod sql_store;
mod sqlite;
mod storage;
mod store;
mod ticket;
mod time;
mod types;
mod versions;
mod writer;

pub use audit::{
    chain_hash, verify_chain, AuditRecord, ChainError, ChainRow, ChainVerifier, Retention,
    VerifyReport, GENESIS,
};
pub use changes::{price_from_usd, price_value, Changed, Target, MAX_CHANGES_PAGE};
pub use checkpoint::{generate_signing_key, parse_public_key, read_signing_key, Checkpoint};
pub use config::{default_db_path, GovConfig};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::GovError;
pub use jwt::{JwtConfig, JwtIdentity, JwtVerifier};
pub use keys::{Principal, Role};
pub use pg::{display_db, is_postgres_url, PgStore};
pub use rate::RateInfo;
pub use sqlite::SqliteStore;
pub use storage::{
    AuditHead, Content, FinishOp, Finished, KeyRow, ReserveOp, Settlement, Store, StoredKey,
    UsageKey,
};
pub use store::{usage_csv, Governance, NewKey, ADMIN_TENANT, ANONYMOUS_TENANT};
pub use ticket::{Reservation, Ticket};
pub use ticket::{CLIENT_CLOSED, LOCAL_BACKEND, TRACE_TARGET};
pub use time::{day_key, month_key, now_ms};
pub use types::{
    BudgetInfo, BudgetPeriod, BudgetUnit, ChangeRecord, ConfigEvent, ConfigVersion, KeyInfo,
    LedgerState, LimitInfo, Limits, TenantInfo, UsageRow,
};

/// Nano-dollars per dollar: money is kept in integer nano-dollars so sums are exact.
pub const NUSD_PER_USD: f64 = 1e9;

/// Converts a price in dollars per million tokens into integer nano-dollars per token.
pub fn nusd_per_token(usd_per_million: f64) -> i64 {
    (usd_per_million * NUSD_PER_USD / 1e6).round() as i64
}

/// Prices in dollars per million tokens as nano-dollars per token, each below $1,000,000 per
/// million tokens: the one conversion for admin changes and config prices.
pub(crate) fn nusd_prices(input_per_m: f64, output_per_m: f64) -> Result<(i64, i64), GovError> {
    let ok = |p: f64| (0.0..1e6).contains(&p);
    if !ok(input_per_m) || !ok(output_per_m) {
        return Err(GovError::Invalid(
            "prices must be between 0 and 1,000,000 dollars per million tokens".into(),
        ));
    }
    Ok((nusd_per_token(input_per_m), nusd_per_token(output_per_m)))
}
