//! Engine metrics, named like vLLM's with a `serrano:` prefix so dashboards port by a prefix swap.
//! The engine updates them; whoever serves `/metrics` encodes [`EngineMetrics::registry`].

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct EngineMetrics {
    pub registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge<f64, AtomicU64>,
    pub kv_cache_waste_perc: Gauge<f64, AtomicU64>,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub num_preemptions: Counter,
    pub prompt_tokens: Family<Labels, Counter>,
    pub generation_tokens: Family<Labels, Counter>,
    pub request_success: Family<Labels, Counter>,
    pub time_to_first_token_seconds: Family<Labels, Histogram>,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Family<Labels, Histogram>,
    pub request_queue_time_seconds: Family<Labels, Histogram>,
    pub iteration_tokens_total: Histogram,
    /// Time to compute one constrained sequence's mask of allowed tokens.
    pub constraint_mask_seconds: Histogram,
    /// Wall time of each step, scheduling and sampling included.
    pub step_seconds: Histogram,
    /// The step-time model's coefficients, by term (`steptime`).
    pub step_time_model: Family<Labels, Gauge<f64, AtomicU64>>,
    /// The model's relative error on the last step, predicted before it ran.
    pub step_time_error_ratio: Gauge<f64, AtomicU64>,
    /// Steps whose prompt tokens were capped to keep the decodes' inter-token target.
    pub steps_capped: Counter,
    /// Steps batch decodes sat out so an interactive prompt could be prefilled.
    pub batch_decode_sit_outs: Counter,
    /// Tokens that missed their class's target, by class and kind (`ttft`, `itl`).
    pub slo_violations: Family<Labels, Counter>,
}

const LATENCY_BUCKETS: [f64; 20] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];
const MASK_BUCKETS: [f64; 10] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
];
const TOKEN_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

fn latency_family() -> Family<Labels, Histogram, fn() -> Histogram> {
    Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS))
}

impl EngineMetrics {
    pub fn new(model_name: &str) -> Self {
        let mut m = EngineMetrics {
            registry: Registry::default(),
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_cache_usage_perc: Gauge::default(),
            kv_cache_waste_perc: Gauge::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            num_preemptions: Counter::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            request_success: Family::default(),
            time_to_first_token_seconds: latency_family(),
            inter_token_latency_seconds: Histogram::new(LATENCY_BUCKETS),
            e2e_request_latency_seconds: latency_family(),
            request_queue_time_seconds: latency_family(),
            iteration_tokens_total: Histogram::new(TOKEN_BUCKETS),
            constraint_mask_seconds: Histogram::new(MASK_BUCKETS),
            step_seconds: Histogram::new(LATENCY_BUCKETS),
            step_time_model: Family::default(),
            step_time_error_ratio: Gauge::default(),
            steps_capped: Counter::default(),
            batch_decode_sit_outs: Counter::default(),
            slo_violations: Family::default(),
        };
        let mut registry = Registry::default();
        let r =
            registry.sub_registry_with_label(("model_name".into(), model_name.to_string().into()));
        r.register(
            "serrano:num_requests_running",
            "Requests in the running batch",
            m.num_requests_running.clone(),
        );
        r.register(
            "serrano:num_requests_waiting",
            "Requests waiting to be scheduled",
            m.num_requests_waiting.clone(),
        );
        r.register(
            "serrano:kv_cache_usage_perc",
            "Fraction of KV blocks in use (0 to 1)",
            m.kv_cache_usage_perc.clone(),
        );
        r.register(
            "serrano:kv_cache_waste_perc",
            "Fraction of the in-use KV blocks' slots that hold no token (0 to 1): the paging overhead",
            m.kv_cache_waste_perc.clone(),
        );
        r.register(
            "serrano:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        r.register(
            "serrano:prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            m.prefix_cache_hits.clone(),
        );
        r.register(
            "serrano:num_preemptions",
            "Sequences preempted for lack of KV blocks",
            m.num_preemptions.clone(),
        );
        r.register(
            "serrano:prompt_tokens",
            "Prompt tokens processed, by tenant",
            m.prompt_tokens.clone(),
        );
        r.register(
            "serrano:generation_tokens",
            "Tokens generated, by tenant",
            m.generation_tokens.clone(),
        );
        r.register(
            "serrano:request_success",
            "Finished requests, by tenant and finished_reason",
            m.request_success.clone(),
        );
        r.register(
            "serrano:time_to_first_token_seconds",
            "Time from arrival to first token, by tenant",
            m.time_to_first_token_seconds.clone(),
        );
        r.register(
            "serrano:inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            m.inter_token_latency_seconds.clone(),
        );
        r.register(
            "serrano:e2e_request_latency_seconds",
            "Time from arrival to the last token, by tenant",
            m.e2e_request_latency_seconds.clone(),
        );
        r.register(
            "serrano:request_queue_time_seconds",
            "Time from arrival to the first scheduled step, by tenant",
            m.request_queue_time_seconds.clone(),
        );
        r.register(
            "serrano:iteration_tokens_total",
            "Tokens per engine step",
            m.iteration_tokens_total.clone(),
        );
        r.register(
            "serrano:constraint_mask_seconds",
            "Time to compute a constrained sequence's mask of allowed tokens (structured outputs, tools)",
            m.constraint_mask_seconds.clone(),
        );
        r.register(
            "serrano:step_seconds",
            "Wall time of each engine step, scheduling and sampling included",
            m.step_seconds.clone(),
        );
        r.register(
            "serrano:step_time_model",
            "The learned step-time model: seconds = intercept + prefill_token * prompt tokens + decode_seq * decoding sequences + kv_kilotoken * positions attended / 1000",
            m.step_time_model.clone(),
        );
        r.register(
            "serrano:step_time_error_ratio",
            "Relative error of the step-time model on the last step ((predicted - measured) / measured)",
            m.step_time_error_ratio.clone(),
        );
        r.register(
            "serrano:steps_capped",
            "Steps whose prompt tokens were cut to keep decoding sequences within the inter-token target",
            m.steps_capped.clone(),
        );
        r.register(
            "serrano:batch_decode_sit_outs",
            "Steps in which batch sequences did not decode so an interactive prompt could be prefilled (at most three in a row)",
            m.batch_decode_sit_outs.clone(),
        );
        r.register(
            "serrano:slo_violations",
            "Tokens that missed their latency class's target: a first token later than the class's TTFT, a gap longer than its inter-token target (interactive: the tenant's slo, else 2 s and --itl-target-ms)",
            m.slo_violations.clone(),
        );
        m.registry = registry;
        m
    }

    /// Prometheus/OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub(crate) fn tenant(t: &str) -> Labels {
    vec![("tenant".into(), t.to_string())]
}
