//! The SQLite writer's ledger: reserve a request's worst case against its budgets and rate
//! limits before it runs, settle the actual usage after, release what a crashed process
//! reserved once it expires. Whether a request fits is the rules' to say (`budget.rs`,
//! `rate.rs`, shared with PostgreSQL); this reads the counts they check and writes what they
//! admit. Every function here runs inside the writer's transaction (see `writer.rs`), so
//! check-and-reserve is atomic. They are synchronous: the writer owns its connection on its own
//! thread.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, Params};

use crate::budget::{self, decode_holds, encode_holds, i64_of, Amount, Budget, Hold};
use crate::error::GovError;
use crate::rate::{self, Limit, RateInfo};
use crate::sql::HOLD_SQL;
use crate::storage::{ReserveOp, Settlement};
use crate::time::day_key;
use crate::types::BudgetUnit;

/// Every row of a statement, each mapped by `f`.
fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, GovError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, f)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The two counters of a statement's one row; (0, 0) where there is no row (nothing counted,
/// nothing set).
fn counters(conn: &Connection, sql: &str, params: impl Params) -> Result<(i64, i64), GovError> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row(params, |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, 0)))
}

fn budgets(conn: &Connection, tenant_id: i64, key_id: i64) -> Result<Vec<Budget>, GovError> {
    let sql = "SELECT id, key_id, unit, period, limit_amount FROM budgets
               WHERE tenant_id = ?1 AND (key_id = 0 OR key_id = ?2) ORDER BY id";
    rows(conn, sql, params![tenant_id, key_id], |r| {
        let (unit, period): (String, String) = (r.get(2)?, r.get(3)?);
        Ok(Budget::from_columns(
            r.get(0)?,
            r.get(1)?,
            &unit,
            &period,
            r.get(4)?,
        ))
    })
}

/// Per-token input and output prices of a model on a backend, in nano-dollars (0 if unset).
fn price(conn: &Connection, model: &str, backend: &str) -> Result<(i64, i64), GovError> {
    let sql = "SELECT input_nusd, output_nusd FROM prices WHERE model = ?1 AND backend = ?2";
    counters(conn, sql, params![model, backend])
}

/// A budget window's (spent, reserved).
fn window_usage(conn: &Connection, budget_id: i64, window: &str) -> Result<(i64, i64), GovError> {
    let sql = "SELECT spent, reserved FROM budget_usage WHERE budget_id = ?1 AND period_key = ?2";
    counters(conn, sql, params![budget_id, window])
}

/// Entries kept in each of the ledger's caches; a full cache starts over.
const MAX_CACHED: usize = 10_000;
/// UTC minutes in a UTC day (tool calls per day are counted over them).
const MINUTES_A_DAY: i64 = 1440;
/// Open requests remembered at once; past it, settlement reads the request back from the store.
const MAX_OPEN: usize = 100_000;

/// A request this writer reserved and has not settled.
#[derive(Debug)]
struct Open {
    tenant_id: i64,
    key_id: i64,
    /// The limits it was counted against, in `minute`, with `tokens` (its worst case).
    limits: Vec<i64>,
    minute: i64,
    tokens: i64,
    holds: Vec<Hold>,
}

/// The ledger as the writer sees it: the rows a reservation and a settlement read (limits,
/// budgets, prices, window counts, open-request counts, the audit chain's head), kept in memory
/// between transactions, and the writer's own open requests.
///
/// Why: reading them back per request was most of the writer's statements, and the writer is
/// the one serial step every request passes twice. The cache is exact, not a guess: it is kept
/// only while no other connection has committed (`PRAGMA data_version`, read once per
/// transaction while holding the write lock), every write the writer makes updates it, and a
/// transaction that fails drops it. So another process (the CLI, a replica on the same file)
/// that changes a budget or reserves against it is seen by the next transaction.
#[derive(Default)]
pub struct Ledger {
    data_version: Option<i64>,
    limits: HashMap<(i64, i64), Vec<Limit>>,
    budgets: HashMap<(i64, i64), Vec<Budget>>,
    prices: HashMap<(String, String), (i64, i64)>,
    /// (limit, minute) -> (requests, tokens).
    windows: HashMap<(i64, i64), (i64, i64)>,
    /// (limit, minute) -> tool calls.
    tool_calls: HashMap<(i64, i64), i64>,
    /// (limit, UTC day) -> tool calls.
    day_calls: HashMap<(i64, i64), i64>,
    /// (budget, window) -> (spent, reserved).
    usage: HashMap<(i64, String), (i64, i64)>,
    /// (tenant, key or 0 for the whole tenant) -> open requests.
    open_counts: HashMap<(i64, i64), i64>,
    open: HashMap<String, Open>,
    /// The audit chain's last (seq, hash).
    pub(crate) head: Option<(i64, String)>,
}

fn cached<K: std::hash::Hash + Eq, V: Clone>(
    map: &mut HashMap<K, V>,
    key: K,
    load: impl FnOnce() -> Result<V, GovError>,
) -> Result<V, GovError> {
    if let Some(v) = map.get(&key) {
        return Ok(v.clone());
    }
    let v = load()?;
    if map.len() >= MAX_CACHED {
        map.clear();
    }
    map.insert(key, v.clone());
    Ok(v)
}

impl Ledger {
    /// Call first in every write transaction: forgets everything if another connection has
    /// committed since the last one.
    pub fn begin(&mut self, conn: &Connection) -> Result<(), GovError> {
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if self.data_version != Some(version) {
            self.forget();
            self.data_version = Some(version);
        }
        Ok(())
    }

    /// Drops every cached row: after a failed transaction, whose writes the cache may hold.
    pub fn forget(&mut self) {
        *self = Ledger::default();
    }

    /// Counts that the writer's own writes keep; dropped when it cannot tell how a write
    /// changed them.
    fn forget_counts(&mut self) {
        self.windows.clear();
        self.tool_calls.clear();
        self.day_calls.clear();
        self.usage.clear();
        self.open_counts.clear();
        self.open.clear();
    }

    fn price(
        &mut self,
        conn: &Connection,
        model: &str,
        backend: &str,
    ) -> Result<(i64, i64), GovError> {
        cached(
            &mut self.prices,
            (model.to_string(), backend.to_string()),
            || price(conn, model, backend),
        )
    }

    /// Tenant-wide and key-specific open requests: the filters a limit of this request may use.
    fn count_keys(tenant_id: i64, key_id: i64) -> impl Iterator<Item = (i64, i64)> {
        let key = (key_id != 0).then_some((tenant_id, key_id));
        std::iter::once((tenant_id, 0)).chain(key)
    }

    /// Reserves the worst case against every rate limit and budget of the tenant and key, or
    /// refuses having written nothing. Errors other than [`GovError::Unavailable`] are refusals
    /// of this request alone; `Unavailable` means the transaction must be abandoned.
    pub fn reserve(
        &mut self,
        conn: &Connection,
        op: &ReserveOp,
        now: i64,
    ) -> Result<Option<RateInfo>, GovError> {
        let (t, k) = (op.tenant_id, op.key_id);
        let worst_tokens = budget::worst_tokens(op);
        let minute = now.div_euclid(60_000);
        let limits = cached(&mut self.limits, (t, k), || limits(conn, t, k))?;
        // First, so that a replayed id is refused as a replay whatever else it would fail.
        let fresh = conn
            .prepare_cached(
                "INSERT INTO requests (request_id, tenant_id, key_id, state, created_ms, expires_ms,
                                       rate_minute, rate_tokens)
                 VALUES (?1, ?2, ?3, 'reserved', ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                op.request_id,
                t,
                k,
                now,
                op.expires_ms,
                (!limits.is_empty()).then_some(minute),
                worst_tokens
            ])?;
        if fresh == 0 {
            return Err(GovError::Duplicate(op.request_id.clone()));
        }
        match self.check(conn, op, &limits, worst_tokens, minute, now) {
            Ok((rate, holds)) => {
                self.hold(conn, op, limits, worst_tokens, minute, holds)?;
                Ok(rate)
            }
            Err(e @ GovError::Unavailable(_)) => Err(e),
            Err(refused) => {
                conn.prepare_cached("DELETE FROM requests WHERE request_id = ?1")?
                    .execute(params![op.request_id])?;
                Err(refused)
            }
        }
    }

    /// Every limit and budget the request must pass, read only.
    fn check(
        &mut self,
        conn: &Connection,
        op: &ReserveOp,
        limits: &[Limit],
        worst_tokens: i64,
        minute: i64,
        now: i64,
    ) -> Result<(Option<RateInfo>, Vec<Hold>), GovError> {
        let (t, k) = (op.tenant_id, op.key_id);
        let mut rate = None;
        for l in limits {
            let open = match l.max_concurrent {
                Some(_) => cached(&mut self.open_counts, (t, l.key_id), || {
                    // The request's own row is already in: count the others.
                    Ok(open_requests(conn, t, l.key_id)? - 1)
                })?,
                None => 0,
            };
            let seen = rate::Seen {
                prev: cached(&mut self.windows, (l.id, minute - 1), || {
                    window(conn, l.id, minute - 1)
                })?,
                curr: cached(&mut self.windows, (l.id, minute), || {
                    window(conn, l.id, minute)
                })?,
                open,
                tokens: worst_tokens,
                now_ms: now,
                calls: match op.tool_call && l.limits_tool_calls() {
                    true => Some(self.calls(conn, l.id, minute)?),
                    false => None,
                },
            };
            rate::check(l, &seen, &mut rate)?;
        }
        let budgets = cached(&mut self.budgets, (t, k), || budgets(conn, t, k))?;
        let mut prices = Vec::new();
        if budgets.iter().any(|b| b.unit == BudgetUnit::Usd) {
            for backend in std::iter::once(&op.backend).chain(&op.fallbacks) {
                prices.push(self.price(conn, &op.model, backend)?);
            }
        }
        let holds = budget::hold(&budgets, Amount::worst(op, prices), now, |b, window| {
            cached(&mut self.usage, (b.id, window.to_string()), || {
                window_usage(conn, b.id, window)
            })
        })?;
        Ok((rate, holds))
    }

    /// A limit's tool calls: the previous and current minute's, and the UTC day's so far.
    fn calls(
        &mut self,
        conn: &Connection,
        limit_id: i64,
        minute: i64,
    ) -> Result<rate::Calls, GovError> {
        let mut at = |m: i64| {
            cached(&mut self.tool_calls, (limit_id, m), || {
                tool_calls_in(conn, limit_id, m, m)
            })
        };
        let (prev, curr) = (at(minute - 1)?, at(minute)?);
        let day = minute.div_euclid(MINUTES_A_DAY);
        let day_calls = cached(&mut self.day_calls, (limit_id, day), || {
            tool_calls_in(conn, limit_id, day * MINUTES_A_DAY, minute)
        })?;
        Ok(rate::Calls {
            prev,
            curr,
            day: day_calls,
        })
    }

    /// Writes what `check` admitted, and keeps the cache equal to it.
    fn hold(
        &mut self,
        conn: &Connection,
        op: &ReserveOp,
        limits: Vec<Limit>,
        worst_tokens: i64,
        minute: i64,
        holds: Vec<Hold>,
    ) -> Result<(), GovError> {
        for l in &limits {
            count(conn, l.id, minute, worst_tokens, op.tool_call)?;
            if let Some(w) = self.windows.get_mut(&(l.id, minute)) {
                *w = (w.0 + 1, w.1.saturating_add(worst_tokens));
            }
            if op.tool_call {
                if let Some(c) = self.tool_calls.get_mut(&(l.id, minute)) {
                    *c += 1;
                }
                if let Some(c) = self
                    .day_calls
                    .get_mut(&(l.id, minute.div_euclid(MINUTES_A_DAY)))
                {
                    *c += 1;
                }
            }
        }
        for h in &holds {
            // The guard repeats the check against the rows themselves: a cache that disagreed
            // with the store would fail the transaction here instead of overspending.
            let ok = conn.prepare_cached(HOLD_SQL)?.execute(params![
                h.budget.id,
                h.window,
                h.amount,
                h.budget.limit
            ])?;
            if ok == 0 {
                return Err(GovError::Unavailable(
                    "the ledger's cache disagreed with the store".into(),
                ));
            }
            if let Some(u) = self.usage.get_mut(&(h.budget.id, h.window.clone())) {
                u.1 = u.1.saturating_add(h.amount);
            }
        }
        if !holds.is_empty() {
            // On the row `reserve` just inserted: its page is already dirty.
            conn.prepare_cached("UPDATE requests SET holds = ?2 WHERE request_id = ?1")?
                .execute(params![op.request_id, encode_holds(&holds)?])?;
        }
        for key in Self::count_keys(op.tenant_id, op.key_id) {
            if let Some(n) = self.open_counts.get_mut(&key) {
                *n += 1;
            }
        }
        if self.open.len() < MAX_OPEN {
            self.open.insert(
                op.request_id.clone(),
                Open {
                    tenant_id: op.tenant_id,
                    key_id: op.key_id,
                    limits: limits.iter().map(|l| l.id).collect(),
                    minute,
                    tokens: worst_tokens,
                    holds,
                },
            );
        }
        Ok(())
    }

    /// Replaces the request's reservations by its actual usage and records the usage; returns
    /// the cost in nano-dollars. A request that never reserved (refused early) is charged
    /// nothing.
    pub fn settle(&mut self, conn: &Connection, s: &Settlement, now: i64) -> Result<i64, GovError> {
        let prices = self.price(conn, &s.model, &s.backend)?;
        let used = Amount::used(prices, s.prompt_tokens, s.completion_tokens);
        match self.open.remove(&s.request_id) {
            Some(open) => {
                let unused = open.tokens - used.tokens;
                if unused > 0 {
                    for &l in &open.limits {
                        refund(conn, l, open.minute, unused)?;
                        if let Some(w) = self.windows.get_mut(&(l, open.minute)) {
                            w.1 = (w.1 - unused).max(0);
                        }
                    }
                }
                for h in &open.holds {
                    // Never charge more than was reserved: the worst case bounds the usage.
                    let charge = used.of(h.budget.unit).min(h.amount);
                    release(conn, h.budget.id, &h.window, h.amount, charge)?;
                    if let Some(u) = self.usage.get_mut(&(h.budget.id, h.window.clone())) {
                        *u = (u.0.saturating_add(charge), u.1 - h.amount);
                    }
                }
                for key in Self::count_keys(open.tenant_id, open.key_id) {
                    if let Some(n) = self.open_counts.get_mut(&key) {
                        *n -= 1;
                    }
                }
            }
            None => {
                let settled = settle_from_store(conn, s, now, used)?;
                // The writes above changed counts the cache may hold.
                self.forget_counts();
                if !settled {
                    return Ok(0);
                }
            }
        }
        conn.prepare_cached(
            "UPDATE requests SET state = 'settled', holds = NULL WHERE request_id = ?1",
        )?
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
            used.cost
        ])?;
        Ok(used.cost)
    }

    /// Releases the reservations of requests past their expiry (their process died or hung).
    /// Returns how many requests expired.
    pub fn expire(&mut self, conn: &Connection, now: i64) -> Result<u64, GovError> {
        let n = expire(conn, now)?;
        if n > 0 {
            self.forget_counts();
        }
        Ok(n)
    }
}

fn release(
    conn: &Connection,
    budget_id: i64,
    window: &str,
    amount: i64,
    charge: i64,
) -> Result<(), GovError> {
    conn.prepare_cached(
        "UPDATE budget_usage SET reserved = reserved - ?3, spent = spent + ?4
         WHERE budget_id = ?1 AND period_key = ?2",
    )?
    .execute(params![budget_id, window, amount, charge])?;
    Ok(())
}

/// Settles a request the writer does not remember (reserved before its cache was dropped) from
/// the rows themselves. False if there is nothing to settle (never reserved, or settled).
fn settle_from_store(
    conn: &Connection,
    s: &Settlement,
    now: i64,
    used: Amount,
) -> Result<bool, GovError> {
    let row: Option<(String, Option<i64>, i64, Option<String>)> = conn
        .prepare_cached(
            "SELECT state, rate_minute, rate_tokens, holds FROM requests WHERE request_id = ?1",
        )?
        .query_row(params![s.request_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((state, rate_minute, rate_tokens, holds)) = row else {
        return Ok(false);
    };
    if state == "settled" {
        return Ok(false);
    }
    if let Some(minute) = rate_minute {
        let unused = rate_tokens - used.tokens;
        if unused > 0 {
            refund_current(conn, s.tenant_id, s.key_id, minute, unused)?;
        }
    }
    if state == "reserved" {
        for (budget_id, window, amount) in decode_holds(holds.as_deref())? {
            // A budget deleted since has no window left to release into.
            let unit: Option<String> = conn
                .prepare_cached("SELECT unit FROM budgets WHERE id = ?1")?
                .query_row(params![budget_id], |r| r.get(0))
                .optional()?;
            if let Some(unit) = unit {
                let unit = BudgetUnit::parse(&unit).unwrap_or(BudgetUnit::Tokens);
                release(conn, budget_id, &window, amount, used.of(unit).min(amount))?;
            }
        }
    } else {
        // The reservation expired (the request outlived its TTL): the usage happened, so
        // charge it to the current windows.
        for b in budgets(conn, s.tenant_id, s.key_id)? {
            conn.prepare_cached(
                "INSERT INTO budget_usage (budget_id, period_key, spent) VALUES (?1, ?2, ?3)
                 ON CONFLICT (budget_id, period_key) DO UPDATE SET spent = spent + excluded.spent",
            )?
            .execute(params![b.id, b.period.key(now), used.of(b.unit)])?;
        }
    }
    Ok(true)
}

/// Most expired requests released in one sweep, so that a sweep after a crash under load (one
/// row per request the dead process had open) is a bounded transaction; the rest go in the next.
const MAX_EXPIRED_PER_SWEEP: i64 = 10_000;

/// Releases the reservations of requests past their expiry (their process died or hung).
/// Returns how many requests expired.
fn expire(conn: &Connection, now: i64) -> Result<u64, GovError> {
    let sql = "SELECT request_id, holds FROM requests WHERE state = 'reserved' AND expires_ms < ?1
               LIMIT ?2";
    let stale: Vec<(String, Option<String>)> =
        rows(conn, sql, params![now, MAX_EXPIRED_PER_SWEEP], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    for (request_id, holds) in &stale {
        for (budget_id, window, amount) in decode_holds(holds.as_deref())? {
            conn.prepare_cached(
                "UPDATE budget_usage SET reserved = reserved - ?3
                 WHERE budget_id = ?1 AND period_key = ?2",
            )?
            .execute(params![budget_id, window, amount])?;
        }
        conn.prepare_cached(
            "UPDATE requests SET state = 'expired', holds = NULL WHERE request_id = ?1",
        )?
        .execute(params![request_id])?;
    }
    Ok(stale.len() as u64)
}

// Rate limits' rows, as the writer reads and counts them (`rate.rs` has the rule).

/// The rate limits of a tenant and key, by id.
fn limits(conn: &Connection, tenant_id: i64, key_id: i64) -> Result<Vec<Limit>, GovError> {
    let sql = "SELECT id, key_id, rpm, tpm, max_concurrent, tool_calls_per_minute,
                      tool_calls_per_day FROM limits
               WHERE tenant_id = ?1 AND (key_id = 0 OR key_id = ?2) ORDER BY id";
    rows(conn, sql, params![tenant_id, key_id], |r| {
        Ok(Limit {
            id: r.get(0)?,
            key_id: r.get(1)?,
            rpm: r.get(2)?,
            tpm: r.get(3)?,
            max_concurrent: r.get(4)?,
            tool_calls_per_minute: r.get(5)?,
            tool_calls_per_day: r.get(6)?,
        })
    })
}

/// A limit's (requests, tokens) counted in one UTC minute.
fn window(conn: &Connection, limit_id: i64, minute: i64) -> Result<(i64, i64), GovError> {
    let sql = "SELECT requests, tokens FROM rate_windows WHERE limit_id = ?1 AND minute = ?2";
    counters(conn, sql, params![limit_id, minute])
}

/// Open reservations of a tenant (`key_id` 0) or of one of its keys, every process counted.
fn open_requests(conn: &Connection, tenant_id: i64, key_id: i64) -> Result<i64, GovError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FROM requests WHERE state = 'reserved' AND tenant_id = ?1
             AND (?2 = 0 OR key_id = ?2)",
        )?
        .query_row(params![tenant_id, key_id], |r| r.get(0))?)
}

/// Counts one admitted request of `tokens` (worst case), a tool call or not, in a limit's
/// current minute.
fn count(
    conn: &Connection,
    limit_id: i64,
    minute: i64,
    tokens: i64,
    tool_call: bool,
) -> Result<(), GovError> {
    conn.prepare_cached(
        "INSERT INTO rate_windows (limit_id, minute, requests, tokens, tool_calls)
         VALUES (?1, ?2, 1, ?3, ?4)
         ON CONFLICT (limit_id, minute) DO UPDATE SET requests = requests + 1,
             tokens = tokens + excluded.tokens, tool_calls = tool_calls + excluded.tool_calls",
    )?
    .execute(params![limit_id, minute, tokens, i64::from(tool_call)])?;
    Ok(())
}

/// A limit's tool calls counted from minute `from` to minute `to`, both included.
fn tool_calls_in(conn: &Connection, limit_id: i64, from: i64, to: i64) -> Result<i64, GovError> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(tool_calls), 0) FROM rate_windows
             WHERE limit_id = ?1 AND minute BETWEEN ?2 AND ?3",
        )?
        .query_row(params![limit_id, from, to], |r| r.get(0))?)
}

/// Gives back the part of a request's worst case it did not use, in the minute it was counted,
/// to the limits it was counted against.
fn refund(conn: &Connection, limit_id: i64, minute: i64, unused: i64) -> Result<(), GovError> {
    conn.prepare_cached(
        "UPDATE rate_windows SET tokens = MAX(0, tokens - ?3) WHERE limit_id = ?1 AND minute = ?2",
    )?
    .execute(params![limit_id, minute, unused])?;
    Ok(())
}

/// [`refund`] for a request whose limits are not known any more (reserved before the writer's
/// cache was dropped): the tenant's and key's current limits.
fn refund_current(
    conn: &Connection,
    tenant_id: i64,
    key_id: i64,
    minute: i64,
    unused: i64,
) -> Result<(), GovError> {
    conn.prepare_cached(
        "UPDATE rate_windows SET tokens = MAX(0, tokens - ?4)
         WHERE minute = ?3 AND limit_id IN (SELECT id FROM limits WHERE tenant_id = ?1 AND key_id IN (0, ?2))",
    )?
    .execute(params![tenant_id, key_id, minute, unused])?;
    Ok(())
}
