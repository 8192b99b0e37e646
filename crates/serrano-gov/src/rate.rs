//! Rate limits' rule, whichever store keeps them: requests and tokens per minute (a sliding
//! window over UTC minutes, the previous minute weighted by how much of it still overlaps the
//! last 60 s) and concurrent requests (open reservations). Pure, as `budget.rs` is for budgets:
//! the SQLite writer (`ledger.rs`) and PostgreSQL (`pg.rs`) count, and both ask [`check`].

use serde::Serialize;

use crate::error::GovError;

/// What a client is told in `x-ratelimit-*` headers: the tightest of its tenant's and key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct RateInfo {
    pub limit_requests: Option<i64>,
    pub remaining_requests: i64,
    /// Seconds until the request window has fully refilled.
    pub reset_requests_s: f64,
    pub limit_tokens: Option<i64>,
    pub remaining_tokens: i64,
    pub reset_tokens_s: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct Limit {
    pub id: i64,
    /// 0 for a tenant-wide limit.
    pub key_id: i64,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub tool_calls_per_minute: Option<i64>,
    pub tool_calls_per_day: Option<i64>,
}

impl Limit {
    /// Whether a tool call must read its counts of tool calls.
    pub fn limits_tool_calls(&self) -> bool {
        self.tool_calls_per_minute.is_some() || self.tool_calls_per_day.is_some()
    }
}

/// What a tool-call limit sees: tool calls in the previous and the current minute, and in the
/// UTC day so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Calls {
    pub prev: i64,
    pub curr: i64,
    pub day: i64,
}

/// Seconds until `need` more fits under `limit`, given the previous and current minute's counts
/// and the fraction `f` of the current minute that has passed; `None` if it never can.
pub fn wait_for(prev: i64, curr: i64, f: f64, need: i64, limit: i64) -> Option<f64> {
    if need > limit {
        return None;
    }
    let room = (limit - need) as f64;
    let (prev, curr) = (prev as f64, curr as f64);
    if prev * (1.0 - f) + curr <= room {
        return Some(0.0);
    }
    if curr <= room {
        // The previous minute's weight decays within this minute.
        let f_ok = 1.0 - (room - curr) / prev;
        return Some((f_ok - f).max(0.0) * 60.0);
    }
    // Only next minute, as this minute's count decays.
    let f_next = 1.0 - room / curr;
    Some((1.0 - f) * 60.0 + f_next.max(0.0) * 60.0)
}

/// What a limit sees of one request: the counts of the previous and current minute, the open
/// requests it covers (this one not included), and the request's worst-case tokens.
pub(crate) struct Seen {
    pub prev: (i64, i64),
    pub curr: (i64, i64),
    pub open: i64,
    pub tokens: i64,
    /// When the request arrived (ms since the epoch): where it falls in the current minute.
    pub now_ms: i64,
    /// For a tool call, the tool calls counted so far; `None` for any other request.
    pub calls: Option<Calls>,
}

/// Checks one request against one limit, tightening `rate` (unlimited until the first limit) to
/// what the client is told; the error is the refusal (nothing is counted: the caller writes only
/// once every limit passed).
pub(crate) fn check(l: &Limit, seen: &Seen, rate: &mut Option<RateInfo>) -> Result<(), GovError> {
    let info = rate.get_or_insert(RateInfo {
        remaining_requests: i64::MAX,
        remaining_tokens: i64::MAX,
        ..Default::default()
    });
    let owner = if l.key_id == 0 { "tenant" } else { "key" };
    if let Some(max) = l.max_concurrent {
        if seen.open + 1 > max {
            return Err(GovError::RateLimited {
                message: format!("Rate limit reached: the {owner}'s limit of {max} concurrent requests. Retry when one finishes."),
                retry_after_s: 1,
            });
        }
    }
    // The fraction of the current minute that has passed.
    let f = seen.now_ms.rem_euclid(60_000) as f64 / 60_000.0;
    if let Some(calls) = &seen.calls {
        check_tool_calls(l, calls, f, seen.now_ms, owner)?;
    }
    let checks = [
        (l.rpm, seen.prev.0, seen.curr.0, 1, "requests"),
        (l.tpm, seen.prev.1, seen.curr.1, seen.tokens, "tokens"),
    ];
    for (limit, p, c, need, what) in checks {
        let Some(limit) = limit else { continue };
        match wait_for(p, c, f, need, limit) {
            Some(w) if w <= 0.0 => {}
            Some(w) => {
                return Err(GovError::RateLimited {
                    message: format!("Rate limit reached: the {owner}'s limit of {limit} {what} per minute. Retry in {w:.1} s."),
                    retry_after_s: w.ceil().max(1.0) as u64,
                })
            }
            None => {
                return Err(GovError::RateLimited {
                    message: format!("This request ({need} {what}, prompt plus max_tokens) exceeds the {owner}'s limit of {limit} {what} per minute; lower max_tokens."),
                    retry_after_s: 60,
                })
            }
        }
        let used = (p as f64 * (1.0 - f) + c as f64).ceil() as i64 + need;
        let remaining = (limit - used).max(0);
        // Full refill: this minute's and the previous minute's counts have both aged out.
        let reset = (1.0 - f) * 60.0 + if c > 0 { 60.0 } else { 0.0 };
        if what == "requests" && remaining < info.remaining_requests {
            (
                info.limit_requests,
                info.remaining_requests,
                info.reset_requests_s,
            ) = (Some(limit), remaining, reset);
        }
        if what == "tokens" && remaining < info.remaining_tokens {
            (
                info.limit_tokens,
                info.remaining_tokens,
                info.reset_tokens_s,
            ) = (Some(limit), remaining, reset);
        }
    }
    Ok(())
}

/// A tool call against the limit's tool calls per minute (sliding, as `rpm`) and per UTC day.
fn check_tool_calls(
    l: &Limit,
    c: &Calls,
    f: f64,
    now_ms: i64,
    owner: &str,
) -> Result<(), GovError> {
    if let Some(limit) = l.tool_calls_per_minute {
        let wait = wait_for(c.prev, c.curr, f, 1, limit);
        if wait.is_none_or(|w| w > 0.0) {
            let w = wait.unwrap_or(60.0);
            return Err(GovError::RateLimited {
                message: format!("Rate limit reached: the {owner}'s limit of {limit} tool calls per minute. Retry in {w:.1} s."),
                retry_after_s: w.ceil().max(1.0) as u64,
            });
        }
    }
    if let Some(limit) = l.tool_calls_per_day {
        if c.day.saturating_add(1) > limit {
            let to_midnight = 86_400 - now_ms.rem_euclid(86_400_000) / 1000;
            return Err(GovError::RateLimited {
                message: format!("Rate limit reached: the {owner}'s limit of {limit} tool calls per day (UTC). Retry in {to_midnight} s."),
                retry_after_s: to_midnight.max(1) as u64,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_limited_per_minute_and_per_day() {
        let l = Limit {
            id: 1,
            key_id: 0,
            rpm: None,
            tpm: None,
            max_concurrent: None,
            tool_calls_per_minute: Some(2),
            tool_calls_per_day: Some(5),
        };
        let seen = |prev, curr, day| Seen {
            prev: (0, 0),
            curr: (0, 0),
            open: 0,
            tokens: 1,
            now_ms: 30_000,
            calls: Some(Calls { prev, curr, day }),
        };
        let mut rate = None;
        assert!(check(&l, &seen(0, 1, 1), &mut rate).is_ok());
        // Two this minute: the third waits.
        let e = check(&l, &seen(0, 2, 2), &mut rate).unwrap_err();
        assert!(e.to_string().contains("2 tool calls per minute"), "{e}");
        // Four of last minute still weigh half.
        assert!(check(&l, &seen(4, 0, 4), &mut rate).is_err());
        // Five today: none more until midnight UTC, 86,370 s after 00:00:30.
        match check(&l, &seen(0, 0, 5), &mut rate) {
            Err(GovError::RateLimited { retry_after_s, .. }) => assert_eq!(retry_after_s, 86_370),
            other => panic!("{other:?}"),
        }
        // Any other request is not a tool call: tool-call limits do not apply.
        let other = Seen {
            calls: None,
            ..seen(9, 9, 9)
        };
        assert!(check(&l, &other, &mut rate).is_ok());
    }

    #[test]
    fn sliding_window_waits() {
        // Empty windows: no wait; a request bigger than the limit: never.
        assert_eq!(wait_for(0, 0, 0.5, 1, 3), Some(0.0));
        assert_eq!(wait_for(0, 0, 0.5, 4, 3), None);
        // 3 of 3 this minute, at its start: the next minute at 1/3 in.
        let w = wait_for(0, 3, 0.0, 1, 3).unwrap();
        assert!((w - 80.0).abs() < 1e-9, "{w}");
        // 3 last minute, none now, half-way: estimate 1.5 + 1 <= 3 already.
        assert_eq!(wait_for(3, 0, 0.5, 1, 3), Some(0.0));
        // 4 last minute, 1 now, a quarter in: need 4 * (1 - f) + 1 <= 2, f >= 0.75.
        let w = wait_for(4, 1, 0.25, 1, 3).unwrap();
        assert!((w - 30.0).abs() < 1e-9, "{w}");
    }
}
