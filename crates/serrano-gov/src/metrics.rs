//! Latency of the store on the request path, for `/metrics`: how long a request waited for its
//! reservation and for its settlement and durable audit record. These are most of what
//! governance adds to a request (BENCHMARKS.md, governance overhead).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub(crate) struct StoreMetrics {
    registry: Registry,
    /// The two label sets, made once: observing allocates nothing per request.
    reserve: Histogram,
    finish: Histogram,
}

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
        StoreMetrics {
            reserve: series("reserve"),
            finish: series("finish"),
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

    /// Prometheus text, without the `# EOF` line.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            return String::new();
        }
        out.trim_end_matches("# EOF\n").to_string()
    }
}
