//! Budgets' rule, whichever store keeps them: what a request's worst case is, which window of
//! each budget it falls in, and whether it fits there (`spent + reserved + amount <= limit`).
//! Pure, as `rate.rs`'s check is for rate limits: the SQLite writer (`ledger.rs`) and
//! PostgreSQL (`pg.rs`) read the counts and write the holds, each its own way, and both ask
//! [`hold`] whether a request may reserve.

use crate::error::GovError;
use crate::storage::ReserveOp;
use crate::types::{BudgetPeriod, BudgetUnit};

/// A budget as a reservation checks it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Budget {
    pub id: i64,
    /// 0 for a tenant-wide budget.
    pub key_id: i64,
    pub unit: BudgetUnit,
    pub period: BudgetPeriod,
    pub limit: i64,
}

impl Budget {
    /// A budget from its stored columns. A unit or period this build does not know reads as
    /// tokens, total: the strictest reading, as every store has read them.
    pub fn from_columns(id: i64, key_id: i64, unit: &str, period: &str, limit: i64) -> Budget {
        Budget {
            id,
            key_id,
            unit: BudgetUnit::parse(unit).unwrap_or(BudgetUnit::Tokens),
            period: BudgetPeriod::parse(period).unwrap_or(BudgetPeriod::Total),
            limit,
        }
    }
}

/// One request's tokens and nano-dollars: its worst case when it reserves, what it used when
/// it settles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Amount {
    pub tokens: i64,
    pub cost: i64,
}

impl Amount {
    /// A request's worst case: its prompt plus `max_tokens`, at the dearest backend it may use.
    /// `prices` are those backends' (input, output) prices per token; a backend without a
    /// price costs nothing.
    pub fn worst(op: &ReserveOp, prices: impl IntoIterator<Item = (i64, i64)>) -> Amount {
        Amount {
            tokens: worst_tokens(op),
            cost: prices
                .into_iter()
                .map(|p| cost(p, op.prompt_tokens, op.max_completion_tokens))
                .fold(0, i64::max),
        }
    }

    /// What a request used, at its backend's `prices`.
    pub fn used(prices: (i64, i64), prompt: u64, completion: u64) -> Amount {
        Amount {
            tokens: i64_of(prompt.saturating_add(completion)),
            cost: cost(prices, prompt, completion),
        }
    }

    /// In a budget's unit.
    pub fn of(self, unit: BudgetUnit) -> i64 {
        match unit {
            BudgetUnit::Tokens => self.tokens,
            BudgetUnit::Usd => self.cost,
        }
    }
}

/// A request's worst case in tokens: prompt plus `max_tokens`.
pub(crate) fn worst_tokens(op: &ReserveOp) -> i64 {
    i64_of(op.prompt_tokens.saturating_add(op.max_completion_tokens))
}

pub(crate) fn cost(prices: (i64, i64), prompt: u64, completion: u64) -> i64 {
    i64_of(prompt)
        .saturating_mul(prices.0)
        .saturating_add(i64_of(completion).saturating_mul(prices.1))
}

/// Token counts come from clients and upstreams: a value past i64 must saturate, never wrap
/// negative (a negative reservation would pass every budget check).
pub(crate) fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What a request holds against one budget window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hold {
    /// As it was when reserved.
    pub budget: Budget,
    pub window: String,
    pub amount: i64,
}

/// The budget-hold rule. A request with worst case `worst`, arriving at `now`, may reserve
/// only if it fits in every budget of its tenant and key (`budgets`, as read for it): in the
/// window of each that `now` falls in (by the budget's period), the window's spent and reserved
/// (`usage(budget, window)`, without this request) plus the worst case in the budget's unit
/// must be within the limit. Returns what to hold, in budget order, or the refusal naming the
/// first budget without room; errors of `usage` are passed on.
pub(crate) fn hold<E: From<GovError>>(
    budgets: &[Budget],
    worst: Amount,
    now: i64,
    mut usage: impl FnMut(&Budget, &str) -> Result<(i64, i64), E>,
) -> Result<Vec<Hold>, E> {
    let mut holds = Vec::with_capacity(budgets.len());
    for b in budgets {
        let amount = worst.of(b.unit);
        let window = b.period.key(now);
        let (spent, reserved) = usage(b, &window)?;
        // Exact, in i128: near i64::MAX a wrapping sum would find room, and a saturating one
        // would find it under a limit of i64::MAX.
        if spent as i128 + reserved as i128 + amount as i128 > b.limit as i128 {
            return Err(refusal(b, amount).into());
        }
        holds.push(Hold {
            budget: b.clone(),
            window,
            amount,
        });
    }
    Ok(holds)
}

/// The refusal of a request whose worst case `amount` has no room in `b`.
pub(crate) fn refusal(b: &Budget, amount: i64) -> GovError {
    let owner = if b.key_id == 0 { "tenant" } else { "key" };
    let (limit, need) = match b.unit {
        BudgetUnit::Tokens => (format!("{} tokens", b.limit), format!("{amount} tokens")),
        BudgetUnit::Usd => (
            format!("${:.6}", b.limit as f64 / crate::NUSD_PER_USD),
            format!("${:.6}", amount as f64 / crate::NUSD_PER_USD),
        ),
    };
    GovError::OverBudget(format!(
        "Budget exceeded: the {owner}'s {} {} budget (budget {}, limit {limit}) has not enough left for this request's worst case ({need}: prompt plus max_tokens)",
        b.period.as_str(),
        b.unit.as_str(),
        b.id,
    ))
}

/// A hold as `requests.holds` keeps it: (budget id, window, amount).
pub(crate) type StoredHold = (i64, String, i64);

pub(crate) fn encode_holds(holds: &[Hold]) -> Result<String, GovError> {
    let stored: Vec<StoredHold> = holds
        .iter()
        .map(|h| (h.budget.id, h.window.clone(), h.amount))
        .collect();
    serde_json::to_string(&stored)
        .map_err(|e| GovError::Unavailable(format!("cannot encode a reservation: {e}")))
}

/// A request without budgets holds nothing (NULL). Text that does not parse fails the
/// transaction: releasing nothing for it would leave the budget reserved forever, and guessing
/// could release what was never reserved.
pub(crate) fn decode_holds(text: Option<&str>) -> Result<Vec<StoredHold>, GovError> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(t).map_err(|e| {
            GovError::Unavailable(format!("a stored reservation does not parse: {e}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::time::{day_key, month_key};

    /// 2026-11-28T12:00:00Z.
    const NOW: i64 = 1_795_867_200_000;

    fn budget(id: i64, unit: BudgetUnit, period: BudgetPeriod, limit: i64) -> Budget {
        Budget {
            id,
            key_id: 0,
            unit,
            period,
            limit,
        }
    }

    fn worst(tokens: i64, cost: i64) -> Amount {
        Amount { tokens, cost }
    }

    /// `hold` over a fixed map of window usage.
    fn hold_with(
        budgets: &[Budget],
        w: Amount,
        usage: &HashMap<(i64, String), (i64, i64)>,
    ) -> Result<Vec<Hold>, GovError> {
        hold(budgets, w, NOW, |b, window| {
            Ok::<_, GovError>(
                usage
                    .get(&(b.id, window.to_string()))
                    .copied()
                    .unwrap_or((0, 0)),
            )
        })
    }

    #[test]
    fn a_request_fits_up_to_the_limit_and_not_past_it() {
        let b = [budget(7, BudgetUnit::Tokens, BudgetPeriod::Total, 100)];
        let usage = HashMap::from([((7, "total".to_string()), (30, 20))]);
        let holds = hold_with(&b, worst(50, 0), &usage).unwrap();
        assert_eq!(
            holds,
            [Hold {
                budget: b[0].clone(),
                window: "total".into(),
                amount: 50
            }]
        );
        let refused = hold_with(&b, worst(51, 0), &usage).unwrap_err();
        assert!(
            matches!(&refused, GovError::OverBudget(m) if m.contains("budget 7") && m.contains("51 tokens")),
            "{refused:?}"
        );
    }

    /// Near i64::MAX the sum neither wraps into room nor saturates into it.
    #[test]
    fn huge_counts_and_requests_find_no_room() {
        let b = [budget(1, BudgetUnit::Tokens, BudgetPeriod::Total, i64::MAX)];
        let usage = HashMap::from([((1, "total".to_string()), (0, 1))]);
        assert!(hold_with(&b, worst(i64::MAX, 0), &usage).is_err());
        assert!(hold_with(&b, worst(i64::MAX - 1, 0), &usage).is_ok());
        let usage = HashMap::from([((1, "total".to_string()), (i64::MAX, i64::MAX))]);
        assert!(hold_with(&b, worst(1, 0), &usage).is_err());
    }

    #[test]
    fn each_budget_holds_in_its_unit_and_its_periods_window() {
        let b = [
            budget(1, BudgetUnit::Tokens, BudgetPeriod::Day, 1_000),
            budget(2, BudgetUnit::Usd, BudgetPeriod::Month, 1_000),
            Budget {
                key_id: 9,
                ..budget(3, BudgetUnit::Tokens, BudgetPeriod::Total, 1_000)
            },
        ];
        let holds = hold_with(&b, worst(40, 700), &HashMap::new()).unwrap();
        let got: Vec<(i64, &str, i64)> = holds
            .iter()
            .map(|h| (h.budget.id, h.window.as_str(), h.amount))
            .collect();
        let (day, month) = (day_key(NOW), month_key(NOW));
        assert_eq!(got, [(1, &*day, 40), (2, &*month, 700), (3, "total", 40)]);
        // Spend in another day's window leaves today's room alone.
        let usage = HashMap::from([((1, "2000-01-01".to_string()), (1_000, 0))]);
        assert!(hold_with(&b, worst(40, 700), &usage).is_ok());
        // The key's budget refuses as the key's.
        let usage = HashMap::from([((3, "total".to_string()), (990, 0))]);
        let refused = hold_with(&b, worst(40, 700), &usage).unwrap_err();
        assert!(
            matches!(&refused, GovError::OverBudget(m) if m.contains("the key's total tokens budget")),
            "{refused:?}"
        );
    }

    #[test]
    fn usage_errors_pass_through() {
        let b = [budget(1, BudgetUnit::Tokens, BudgetPeriod::Total, 10)];
        let down = GovError::Unavailable("down".into());
        let e = hold(&b, worst(1, 0), NOW, |_, _| Err(down.clone())).unwrap_err();
        assert_eq!(e, down);
    }

    #[test]
    fn worst_and_used_amounts_saturate() {
        let op = ReserveOp {
            request_id: "r".into(),
            tenant_id: 1,
            key_id: 0,
            model: "m".into(),
            backend: "a".into(),
            fallbacks: vec!["b".into()],
            prompt_tokens: 10,
            max_completion_tokens: u64::MAX,
            expires_ms: 0,
            tool_call: false,
        };
        let w = Amount::worst(&op, [(1, 2), (3, 1)]);
        assert_eq!(w, worst(i64::MAX, i64::MAX));
        let op = ReserveOp {
            max_completion_tokens: 5,
            ..op
        };
        // The dearest backend's price, and nothing for backends without one.
        assert_eq!(Amount::worst(&op, [(1, 2), (3, 1)]), worst(15, 35));
        assert_eq!(Amount::worst(&op, []), worst(15, 0));
        assert_eq!(Amount::used((2, 3), 4, 5), worst(9, 23));
    }

    fn any_budget() -> impl Strategy<Value = Budget> {
        (
            0..4i64,
            prop_oneof![Just(BudgetUnit::Tokens), Just(BudgetUnit::Usd)],
            prop_oneof![
                Just(BudgetPeriod::Day),
                Just(BudgetPeriod::Month),
                Just(BudgetPeriod::Total)
            ],
            prop_oneof![0..1_000i64, Just(i64::MAX)],
        )
            .prop_map(|(key_id, unit, period, limit)| Budget {
                id: 0,
                key_id,
                unit,
                period,
                limit,
            })
    }

    fn any_count() -> impl Strategy<Value = i64> {
        prop_oneof![0..1_000i64, Just(i64::MAX / 2), Just(i64::MAX)]
    }

    proptest! {
        /// The rule, against exact arithmetic: a request is admitted exactly when every budget's
        /// window has room for it; a refusal names the first budget without room; an admission
        /// holds the worst case in each budget's unit, in the window its period gives.
        #[test]
        fn admits_exactly_what_fits_everywhere(
            budgets in prop::collection::vec(any_budget(), 0..5),
            counts in prop::collection::vec((any_count(), any_count()), 5),
            tokens in any_count(),
            cost in any_count(),
        ) {
            let budgets: Vec<Budget> = budgets
                .into_iter()
                .enumerate()
                .map(|(i, b)| Budget { id: i as i64 + 1, ..b })
                .collect();
            let w = worst(tokens, cost);
            let usage: HashMap<(i64, String), (i64, i64)> = budgets
                .iter()
                .map(|b| ((b.id, b.period.key(NOW)), counts[b.id as usize - 1]))
                .collect();
            let fits = |b: &Budget| {
                let (spent, reserved) = usage[&(b.id, b.period.key(NOW))];
                spent as i128 + reserved as i128 + w.of(b.unit) as i128 <= b.limit as i128
            };
            match hold_with(&budgets, w, &usage) {
                Ok(holds) => {
                    prop_assert!(budgets.iter().all(fits));
                    prop_assert_eq!(holds.len(), budgets.len());
                    for (h, b) in holds.iter().zip(&budgets) {
                        prop_assert_eq!(&h.budget, b);
                        prop_assert_eq!(&h.window, &b.period.key(NOW));
                        prop_assert_eq!(h.amount, w.of(b.unit));
                    }
                }
                Err(e) => {
                    let first = budgets.iter().find(|b| !fits(b));
                    prop_assert!(first.is_some(), "refused though everything fits: {:?}", e);
                    let expected = first.map(|b| refusal(b, w.of(b.unit)));
                    prop_assert_eq!(Some(e), expected);
                }
            }
        }

        /// Reservations admitted one after another, each counted as reserved, never take a
        /// window past its limit, however large the requests.
        #[test]
        fn admitted_reservations_never_pass_a_limit(
            budgets in prop::collection::vec(any_budget(), 1..4),
            requests in prop::collection::vec((0..400i64, 0..400i64), 1..40),
        ) {
            let budgets: Vec<Budget> = budgets
                .into_iter()
                .enumerate()
                .map(|(i, b)| Budget { id: i as i64 + 1, ..b })
                .collect();
            let mut usage = HashMap::new();
            for (tokens, cost) in requests {
                if let Ok(holds) = hold_with(&budgets, worst(tokens, cost), &usage) {
                    for h in holds {
                        let u = usage.entry((h.budget.id, h.window)).or_insert((0, 0));
                        u.1 += h.amount;
                    }
                }
                for b in &budgets {
                    let (spent, reserved) =
                        usage.get(&(b.id, b.period.key(NOW))).copied().unwrap_or((0, 0));
                    prop_assert!(spent + reserved <= b.limit);
                }
            }
        }
    }
}
