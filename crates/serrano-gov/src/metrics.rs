//! Governance on `/metrics`: how long a request waited for its reservation and for its
//! settlement and durable audit record (most of what governance adds to a request:
//! BENCHMARKS.md, governance overhead), the writer's queue, and each budget's use (what the
//! alert rules in `deploy/prometheus/` watch).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::types::BudgetInfo;

type Labels = Vec<(String, String)>;

pub(crate) struct StoreMetrics {
    registry: Registry,
    /// The two label sets, made once: observing allocates nothing per request.
    reserve: Histogram,
    finish: Histogram,
    /// Set when encoded, where the store has a write queue.
    queue: Gauge,
    queue_capacity: Gauge,
}

/// Most budgets `/metrics` reports a series for (the first by id).
pub const MAX_BUDGET_SERIES: usize = 256;

/// The store operation a request waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StoreOp {
    Reserve,
    Finish,
}

fn histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
    ])
}

impl StoreMetrics {
    /// `store` labels every series (`sqlite`, `postgres`).
    pub(crate) fn new(store: &str) -> StoreMetrics {
        let mut registry = Registry::with_prefix("serrano");
        let seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram as fn() -> Histogram);
        registry.register(
            "gov_store_seconds",
            "Time a request waited for the governance store: op=reserve (budgets and rate \
             limits checked, worst case reserved) or op=finish (settled, audit record durable)",
            seconds.clone(),
        );
        let series = |op: &str| {
            let labels = vec![
                ("op".to_string(), op.to_string()),
                ("store".to_string(), store.to_string()),
            ];
            seconds.get_or_create(&labels).clone()
        };
        let (queue, queue_capacity) = (Gauge::default(), Gauge::default());
        StoreMetrics {
            reserve: series("reserve"),
            finish: series("finish"),
            queue,
            queue_capacity,
            registry,
        }
    }

    pub(crate) fn observe(&self, op: StoreOp, took: Duration) {
        let h = match op {
            StoreOp::Reserve => &self.reserve,
            StoreOp::Finish => &self.finish,
        };
        h.observe(took.as_secs_f64());
    }

    /// Prometheus text, without the `# EOF` line; `write_queue` is the store's
    /// [`Store::write_queue`](crate::Store::write_queue).
    pub(crate) fn encode(&self, write_queue: Option<(usize, usize)>) -> String {
        let mut out = text(&self.registry);
        if let Some((queued, capacity)) = write_queue {
            let mut registry = Registry::with_prefix("serrano");
            self.queue.set(queued as i64);
            self.queue_capacity.set(capacity as i64);
            registry.register(
                "gov_write_queue",
                "Ledger and audit writes waiting for the store's writer thread",
                self.queue.clone(),
            );
            registry.register(
                "gov_write_queue_capacity",
                "Writes that may wait for the writer; past it requests wait --db-busy-timeout, \
                 then fail closed",
                self.queue_capacity.clone(),
            );
            out.push_str(&text(&registry));
        }
        out
    }
}

/// Each budget's use of its current window, `(spent + reserved) / limit` (1 when the limit is
/// 0), for the first [`MAX_BUDGET_SERIES`] budgets.
pub(crate) fn encode_budgets(budgets: &[BudgetInfo]) -> String {
    let mut registry = Registry::with_prefix("serrano");
    let used: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    registry.register(
        "budget_used_ratio",
        "Spent plus reserved over the limit, of each budget's current window (1: exhausted)",
        used.clone(),
    );
    for b in budgets.iter().take(MAX_BUDGET_SERIES) {
        let labels = vec![
            ("tenant".to_string(), b.tenant.clone()),
            ("key_id".to_string(), b.key_id.to_string()),
            ("unit".to_string(), b.unit.as_str().to_string()),
            ("period".to_string(), b.period.as_str().to_string()),
        ];
        let ratio = match b.limit {
            0 => 1.0,
            limit => (b.spent + b.reserved) as f64 / limit as f64,
        };
        used.get_or_create(&labels).set(ratio);
    }
    text(&registry)
}

/// A registry's text without its `# EOF` line (the caller ends the whole scrape).
fn text(registry: &Registry) -> String {
    let mut out = String::new();
    if encode(&mut out, registry).is_err() {
        return String::new();
    }
    out.trim_end_matches("# EOF\n").to_string()
}
