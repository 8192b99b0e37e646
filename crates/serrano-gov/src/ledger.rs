//! Budgets as a ledger: reserve a request's worst case before it runs, settle the actual usage
//! after, release what a crashed process reserved once it expires. Every function here runs
//! inside the writer's transaction (see `writer.rs`), so check-and-reserve is atomic. They are
//! synchronous: the writer owns its connection on its own thread.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::GovError;
use crate::rate::{self, RateInfo};
use crate::storage::{ReserveOp, Settlement};
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

struct Budget {
    id: i64,
    key_id: i64,
    unit: BudgetUnit,
    period: BudgetPeriod,
    limit: i64,
}

fn budgets(conn: &Connection, tenant_id: i64, key_id: i64) -> Result<Vec<Budget>, GovError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, key_id, unit, period, limit_amount FROM budgets
         WHERE tenant_id = ?1 AND key_id IN (0, ?2) ORDER BY id",
    )?;
    let rows = stmt.query_map(params![tenant_id, key_id], |r| {
        Ok(Budget {
            id: r.get(0)?,
            key_id: r.get(1)?,
            unit: BudgetUnit::parse(&r.get::<_, String>(2)?).unwrap_or(BudgetUnit::Tokens),
            period: BudgetPeriod::parse(&r.get::<_, String>(3)?).unwrap_or(BudgetPeriod::Total),
            limit: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Per-token input and output prices of a model on a backend, in nano-dollars (0 if unset).
pub fn price(conn: &Connection, model: &str, backend: &str) -> Result<(i64, i64), GovError> {
    Ok(conn
        .prepare_cached(
            "SELECT input_nusd, output_nusd FROM prices WHERE model = ?1 AND backend = ?2",
        )?
        .query_row(params![model, backend], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, 0)))
}

fn cost(prices: (i64, i64), prompt: u64, completion: u64) -> i64 {
    i64_of(prompt)
        .saturating_mul(prices.0)
        .saturating_add(i64_of(completion).saturating_mul(prices.1))
}

/// Token counts come from clients and upstreams: a value past i64 must saturate, never wrap
/// negative (a negative reservation would pass every budget check).
fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reserves the worst case against every rate limit and budget of the tenant and key, or none
/// of them (the caller's savepoint undoes a partial reservation).
pub fn reserve(conn: &Connection, op: &ReserveOp, now: i64) -> Result<Option<RateInfo>, GovError> {
    let fresh = conn
        .prepare_cached(
            "INSERT INTO requests (request_id, tenant_id, key_id, state, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, 'reserved', ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            op.request_id,
            op.tenant_id,
            op.key_id,
            now,
            op.expires_ms
        ])?;
    if fresh == 0 {
        return Err(GovError::Duplicate(op.request_id.clone()));
    }
    let worst_tokens = i64_of(op.prompt_tokens.saturating_add(op.max_completion_tokens));
    let rate = rate::admit(conn, op.tenant_id, op.key_id, worst_tokens, now)?;
    if rate.is_some() {
        conn.prepare_cached(
            "UPDATE requests SET rate_minute = ?2, rate_tokens = ?3 WHERE request_id = ?1",
        )?
        .execute(params![op.request_id, now.div_euclid(60_000), worst_tokens])?;
    }
    let budgets = budgets(conn, op.tenant_id, op.key_id)?;
    if budgets.is_empty() {
        return Ok(rate);
    }
    let mut worst_cost = 0;
    for backend in std::iter::once(&op.backend).chain(&op.fallbacks) {
        let prices = price(conn, &op.model, backend)?;
        worst_cost = worst_cost.max(cost(prices, op.prompt_tokens, op.max_completion_tokens));
    }
    for b in budgets {
        let amount = match b.unit {
            BudgetUnit::Tokens => worst_tokens,
            BudgetUnit::Usd => worst_cost,
        };
        let window = b.period.key(now);
        conn.prepare_cached(
            "INSERT INTO budget_usage (budget_id, period_key) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?
        .execute(params![b.id, window])?;
        let ok = conn
            .prepare_cached(
                "UPDATE budget_usage SET reserved = reserved + ?3
                 WHERE budget_id = ?1 AND period_key = ?2 AND spent + reserved + ?3 <= ?4",
            )?
            .execute(params![b.id, window, amount, b.limit])?;
        if ok == 0 {
            return Err(GovError::OverBudget(over_budget_message(&b, amount)));
        }
        conn.prepare_cached(
            "INSERT INTO reservations (request_id, budget_id, period_key, amount) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![op.request_id, b.id, window, amount])?;
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
pub fn settle(conn: &Connection, s: &Settlement, now: i64) -> Result<i64, GovError> {
    let row: Option<(String, Option<i64>, i64)> = conn
        .prepare_cached(
            "SELECT state, rate_minute, rate_tokens FROM requests WHERE request_id = ?1",
        )?
        .query_row(params![s.request_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((state, rate_minute, rate_tokens)) = row else {
        return Ok(0);
    };
    if state == "settled" {
        return Ok(0);
    }
    let prices = price(conn, &s.model, &s.backend)?;
    let actual_cost = cost(prices, s.prompt_tokens, s.completion_tokens);
    let actual_tokens = i64_of(s.prompt_tokens.saturating_add(s.completion_tokens));
    let actual = |unit: BudgetUnit| match unit {
        BudgetUnit::Tokens => actual_tokens,
        BudgetUnit::Usd => actual_cost,
    };
    if let Some(minute) = rate_minute {
        rate::refund(
            conn,
            s.tenant_id,
            s.key_id,
            minute,
            rate_tokens - actual_tokens,
        )?;
    }
    if state == "reserved" {
        let held: Vec<(i64, String, i64, String)> = conn
            .prepare_cached(
                "SELECT r.budget_id, r.period_key, r.amount, b.unit FROM reservations r
                 JOIN budgets b ON b.id = r.budget_id WHERE r.request_id = ?1",
            )?
            .query_map(params![s.request_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        for (budget_id, window, amount, unit) in held {
            let unit = BudgetUnit::parse(&unit).unwrap_or(BudgetUnit::Tokens);
            // Never charge more than was reserved: the worst case bounds the actual usage.
            let charge = actual(unit).min(amount);
            conn.prepare_cached(
                "UPDATE budget_usage SET reserved = reserved - ?3, spent = spent + ?4
                 WHERE budget_id = ?1 AND period_key = ?2",
            )?
            .execute(params![budget_id, window, amount, charge])?;
        }
        conn.prepare_cached("DELETE FROM reservations WHERE request_id = ?1")?
            .execute(params![s.request_id])?;
    } else {
        // The reservation expired (the request outlived its TTL): the usage happened, so
        // charge it to the current windows.
        for b in budgets(conn, s.tenant_id, s.key_id)? {
            conn.prepare_cached(
                "INSERT INTO budget_usage (budget_id, period_key, spent) VALUES (?1, ?2, ?3)
                 ON CONFLICT (budget_id, period_key) DO UPDATE SET spent = spent + excluded.spent",
            )?
            .execute(params![b.id, b.period.key(now), actual(b.unit)])?;
        }
    }
    conn.prepare_cached("UPDATE requests SET state = 'settled' WHERE request_id = ?1")?
        .execute(params![s.request_id])?;
    conn.prepare_cached(
        "INSERT INTO usage (request_id, time_ms, day, tenant, key_prefix, model, backend,
                            prompt_tokens, completion_tokens, cost_nusd)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        s.request_id,
        now,
        day_key(now),
        s.tenant,
        s.key_prefix,
        s.model,
        s.backend,
        i64_of(s.prompt_tokens),
        i64_of(s.completion_tokens),
        actual_cost
    ])?;
    Ok(actual_cost)
}

/// Releases the reservations of requests past their expiry (their process died or hung).
/// Returns how many requests expired.
pub fn expire(conn: &Connection, now: i64) -> Result<u64, GovError> {
    let stale: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM requests WHERE state = 'reserved' AND expires_ms < ?1",
        )?
        .query_row(params![now], |r| r.get(0))?;
    if stale == 0 {
        return Ok(0);
    }
    conn.execute(
        "UPDATE budget_usage SET reserved = reserved - (
             SELECT COALESCE(SUM(r.amount), 0) FROM reservations r JOIN requests q USING (request_id)
             WHERE q.state = 'reserved' AND q.expires_ms < ?1
               AND r.budget_id = budget_usage.budget_id AND r.period_key = budget_usage.period_key)
         WHERE EXISTS (
             SELECT 1 FROM reservations r JOIN requests q USING (request_id)
             WHERE q.state = 'reserved' AND q.expires_ms < ?1
               AND r.budget_id = budget_usage.budget_id AND r.period_key = budget_usage.period_key)",
        params![now],
    )?;
    conn.execute(
        "DELETE FROM reservations WHERE request_id IN (
             SELECT request_id FROM requests WHERE state = 'reserved' AND expires_ms < ?1)",
        params![now],
    )?;
    let n = conn.execute(
        "UPDATE requests SET state = 'expired' WHERE state = 'reserved' AND expires_ms < ?1",
        params![now],
    )?;
    Ok(n as u64)
}
