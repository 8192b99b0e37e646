//! Budgets as a ledger: reserve a request's worst case before it runs, settle the actual usage
//! after, release what a crashed process reserved once it expires. Every function here runs
//! inside the writer's transaction (see `writer.rs`), so check-and-reserve is atomic.

use serde::{Deserialize, Serialize};
use sqlx::{Row, SqliteConnection};

use crate::error::GovError;
use crate::rate::{self, RateInfo};
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

/// A request's worst case, to reserve before it runs.
#[derive(Debug, Clone)]
pub struct ReserveOp {
    pub request_id: String,
    pub tenant_id: i64,
    pub key_id: i64,
    pub model: String,
    pub backend: String,
    pub prompt_tokens: u64,
    pub max_completion_tokens: u64,
    pub expires_ms: i64,
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

struct Budget {
    id: i64,
    key_id: i64,
    unit: BudgetUnit,
    period: BudgetPeriod,
    limit: i64,
}

async fn budgets(
    conn: &mut SqliteConnection,
    tenant_id: i64,
    key_id: i64,
) -> Result<Vec<Budget>, GovError> {
    let rows = sqlx::query(
        "SELECT id, key_id, unit, period, limit_amount FROM budgets
         WHERE tenant_id = ?1 AND key_id IN (0, ?2) ORDER BY id",
    )
    .bind(tenant_id)
    .bind(key_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Budget {
                id: r.try_get("id")?,
                key_id: r.try_get("key_id")?,
                unit: BudgetUnit::parse(r.try_get("unit")?).unwrap_or(BudgetUnit::Tokens),
                period: BudgetPeriod::parse(r.try_get("period")?).unwrap_or(BudgetPeriod::Total),
                limit: r.try_get("limit_amount")?,
            })
        })
        .collect()
}

/// Per-token input and output prices of a model on a backend, in nano-dollars (0 if unset).
pub async fn price(
    conn: &mut SqliteConnection,
    model: &str,
    backend: &str,
) -> Result<(i64, i64), GovError> {
    let row =
        sqlx::query("SELECT input_nusd, output_nusd FROM prices WHERE model = ?1 AND backend = ?2")
            .bind(model)
            .bind(backend)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match row {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, 0),
    })
}

fn cost(prices: (i64, i64), prompt: u64, completion: u64) -> i64 {
    (prompt as i64).saturating_mul(prices.0) + (completion as i64).saturating_mul(prices.1)
}

/// Reserves the worst case against every rate limit and budget of the tenant and key, or none
/// of them (the caller's savepoint undoes a partial reservation).
pub async fn reserve(
    conn: &mut SqliteConnection,
    op: &ReserveOp,
    now: i64,
) -> Result<Option<RateInfo>, GovError> {
    let fresh = sqlx::query(
        "INSERT INTO requests (request_id, tenant_id, key_id, state, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, 'reserved', ?4, ?5) ON CONFLICT DO NOTHING",
    )
    .bind(&op.request_id)
    .bind(op.tenant_id)
    .bind(op.key_id)
    .bind(now)
    .bind(op.expires_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if fresh == 0 {
        return Err(GovError::Duplicate(op.request_id.clone()));
    }
    let worst_tokens = op.prompt_tokens.saturating_add(op.max_completion_tokens) as i64;
    let rate = rate::admit(conn, op.tenant_id, op.key_id, worst_tokens, now).await?;
    if rate.is_some() {
        sqlx::query("UPDATE requests SET rate_minute = ?2, rate_tokens = ?3 WHERE request_id = ?1")
            .bind(&op.request_id)
            .bind(now.div_euclid(60_000))
            .bind(worst_tokens)
            .execute(&mut *conn)
            .await?;
    }
    let prices = price(conn, &op.model, &op.backend).await?;
    let worst_cost = cost(prices, op.prompt_tokens, op.max_completion_tokens);
    for b in budgets(conn, op.tenant_id, op.key_id).await? {
        let amount = match b.unit {
            BudgetUnit::Tokens => worst_tokens,
            BudgetUnit::Usd => worst_cost,
        };
        let window = b.period.key(now);
        sqlx::query("INSERT INTO budget_usage (budget_id, period_key) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
            .bind(b.id)
            .bind(&window)
            .execute(&mut *conn)
            .await?;
        let ok = sqlx::query(
            "UPDATE budget_usage SET reserved = reserved + ?3
             WHERE budget_id = ?1 AND period_key = ?2 AND spent + reserved + ?3 <= ?4",
        )
        .bind(b.id)
        .bind(&window)
        .bind(amount)
        .bind(b.limit)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if ok == 0 {
            return Err(GovError::OverBudget(over_budget_message(&b, amount)));
        }
        sqlx::query("INSERT INTO reservations (request_id, budget_id, period_key, amount) VALUES (?1, ?2, ?3, ?4)")
            .bind(&op.request_id)
            .bind(b.id)
            .bind(&window)
            .bind(amount)
            .execute(&mut *conn)
            .await?;
    }
    Ok(rate)
}

fn over_budget_message(b: &Budget, amount: i64) -> String {
    let owner = if b.key_id == 0 { "tenant" } else { "key" };
    let (limit, need) = match b.unit {
        BudgetUnit::Tokens => (format!("{} tokens", b.limit), format!("{amount} tokens")),
        BudgetUnit::Usd => (
            format!("${:.6}", b.limit as f64 / crate::NUSD_PER_USD),
            format!("${:.6}", amount as f64 / crate::NUSD_PER_USD),
        ),
    };
    format!(
        "Budget exceeded: the {owner}'s {} {} budget (budget {}, limit {limit}) has not enough left for this request's worst case ({need}: prompt plus max_tokens)",
        b.period.as_str(),
        b.unit.as_str(),
        b.id,
    )
}

/// Replaces the request's reservations by its actual usage and records the usage; returns the
/// cost in nano-dollars. A request that never reserved (refused early) is charged nothing.
pub async fn settle(
    conn: &mut SqliteConnection,
    s: &Settlement,
    now: i64,
) -> Result<i64, GovError> {
    let row =
        sqlx::query("SELECT state, rate_minute, rate_tokens FROM requests WHERE request_id = ?1")
            .bind(&s.request_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(0) };
    let state: String = row.try_get("state")?;
    if state == "settled" {
        return Ok(0);
    }
    let prices = price(conn, &s.model, &s.backend).await?;
    let actual_cost = cost(prices, s.prompt_tokens, s.completion_tokens);
    let actual_tokens = s.prompt_tokens.saturating_add(s.completion_tokens) as i64;
    let actual = |unit: BudgetUnit| match unit {
        BudgetUnit::Tokens => actual_tokens,
        BudgetUnit::Usd => actual_cost,
    };
    let held = sqlx::query(
        "SELECT r.budget_id, r.period_key, r.amount, b.unit FROM reservations r
         JOIN budgets b ON b.id = r.budget_id WHERE r.request_id = ?1",
    )
    .bind(&s.request_id)
    .fetch_all(&mut *conn)
    .await?;
    if let Some(minute) = row.try_get::<Option<i64>, _>("rate_minute")? {
        let unused = row.try_get::<i64, _>("rate_tokens")? - actual_tokens;
        rate::refund(conn, s.tenant_id, s.key_id, minute, unused).await?;
    }
    if state == "reserved" {
        for r in &held {
            let unit = BudgetUnit::parse(r.try_get("unit")?).unwrap_or(BudgetUnit::Tokens);
            let amount: i64 = r.try_get("amount")?;
            // Never charge more than was reserved: the worst case bounds the actual usage.
            let charge = actual(unit).min(amount);
            sqlx::query(
                "UPDATE budget_usage SET reserved = reserved - ?3, spent = spent + ?4
                 WHERE budget_id = ?1 AND period_key = ?2",
            )
            .bind(r.try_get::<i64, _>("budget_id")?)
            .bind(r.try_get::<String, _>("period_key")?)
            .bind(amount)
            .bind(charge)
            .execute(&mut *conn)
            .await?;
        }
    } else {
        // The reservation expired (the request outlived its TTL): the usage happened, so
        // charge it to the current windows.
        for b in budgets(conn, s.tenant_id, s.key_id).await? {
            let window = b.period.key(now);
            sqlx::query(
                "INSERT INTO budget_usage (budget_id, period_key, spent) VALUES (?1, ?2, ?3)
                 ON CONFLICT (budget_id, period_key) DO UPDATE SET spent = spent + excluded.spent",
            )
            .bind(b.id)
            .bind(&window)
            .bind(actual(b.unit))
            .execute(&mut *conn)
            .await?;
        }
    }
    sqlx::query("DELETE FROM reservations WHERE request_id = ?1")
        .bind(&s.request_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE requests SET state = 'settled' WHERE request_id = ?1")
        .bind(&s.request_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO usage (request_id, time_ms, day, tenant, key_prefix, model, backend,
                            prompt_tokens, completion_tokens, cost_nusd)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .bind(&s.request_id)
    .bind(now)
    .bind(day_key(now))
    .bind(&s.tenant)
    .bind(&s.key_prefix)
    .bind(&s.model)
    .bind(&s.backend)
    .bind(s.prompt_tokens as i64)
    .bind(s.completion_tokens as i64)
    .bind(actual_cost)
    .execute(&mut *conn)
    .await?;
    Ok(actual_cost)
}

/// Releases the reservations of requests past their expiry (their process died or hung).
/// Returns how many requests expired.
pub async fn expire(conn: &mut SqliteConnection, now: i64) -> Result<u64, GovError> {
    sqlx::query(
        "UPDATE budget_usage SET reserved = reserved - (
             SELECT COALESCE(SUM(r.amount), 0) FROM reservations r JOIN requests q USING (request_id)
             WHERE q.state = 'reserved' AND q.expires_ms < ?1
               AND r.budget_id = budget_usage.budget_id AND r.period_key = budget_usage.period_key)
         WHERE EXISTS (
             SELECT 1 FROM reservations r JOIN requests q USING (request_id)
             WHERE q.state = 'reserved' AND q.expires_ms < ?1
               AND r.budget_id = budget_usage.budget_id AND r.period_key = budget_usage.period_key)",
    )
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM reservations WHERE request_id IN (
             SELECT request_id FROM requests WHERE state = 'reserved' AND expires_ms < ?1)",
    )
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let n = sqlx::query(
        "UPDATE requests SET state = 'expired' WHERE state = 'reserved' AND expires_ms < ?1",
    )
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}
