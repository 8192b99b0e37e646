//! The records governance keeps and reports: tenants, keys, budgets, limits, usage, config
//! versions. Plain data shared by the facade (`store.rs`), the storage trait (`storage.rs`), the
//! ledger and both stores, kept here so that none of those has to import another for them.

use serde::{Deserialize, Serialize};

use crate::audit::Retention;
use crate::keys::Role;
use crate::time::{day_key, month_key};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetUnit {
    Tokens,
    /// Stored in nano-dollars.
    Usd,
}

impl BudgetUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetUnit::Tokens => "tokens",
            BudgetUnit::Usd => "usd",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tokens" => Some(BudgetUnit::Tokens),
            "usd" => Some(BudgetUnit::Usd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Total => "total",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            "total" => Some(BudgetPeriod::Total),
            _ => None,
        }
    }
    /// The window a time falls in: `2026-11-28`, `2026-11` or `total`.
    pub fn key(self, now_ms: i64) -> String {
        match self {
            BudgetPeriod::Day => day_key(now_ms),
            BudgetPeriod::Month => month_key(now_ms),
            BudgetPeriod::Total => "total".into(),
        }
    }
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
    /// May ask for the interactive latency class though its tenant's is batch.
    pub grant_interactive: bool,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
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
    /// The backend that served the requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
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
    /// MCP tool calls per minute (the same sliding window as `rpm`).
    #[serde(default)]
    pub tool_calls_per_minute: Option<i64>,
    /// MCP tool calls per UTC day.
    #[serde(default)]
    pub tool_calls_per_day: Option<i64>,
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

#[derive(Debug, Clone, Serialize)]
pub struct ConfigVersion {
    pub version: u64,
    pub hash: String,
    pub created_ms: i64,
    pub author: String,
    /// The TOML text (left out of listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigEvent {
    pub version: u64,
    pub time_ms: i64,
    pub author: String,
    pub action: String,
}

/// One admin change as stored: who made it, what it applied to, the values before and after
/// (JSON; `null` where there was none), and the audit chain record that holds it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChangeRecord {
    pub id: i64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub kind: String,
    pub target: serde_json::Value,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
    /// `None` while the change is being applied (or was interrupted before its record).
    pub audit_seq: Option<u64>,
}

/// A change to store before it is applied.
#[derive(Debug, Clone)]
pub struct NewChange<'a> {
    pub time_ms: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub kind: &'a str,
    /// JSON texts.
    pub target: &'a str,
    pub before: &'a str,
    pub after: &'a str,
}
