//! `serrano bench`: a load generator for any OpenAI-compatible endpoint (serrano, llama.cpp's
//! llama-server, vLLM) that reports what buyers of inference compare: TTFT, inter-token latency,
//! percentiles with confidence intervals, goodput under an SLO, and cost per 1M tokens.
//!
//! TTFT is measured from the *intended* send time in open loops, so a saturated server (or
//! client) cannot hide queueing (no coordinated omission). Metric definitions are in `metrics`.

pub mod client;
pub mod energy;
pub mod html;
pub mod metrics;
pub mod report;
pub mod run;
pub mod sweep;
pub mod workload;

pub use client::Target;
pub use metrics::{RequestRecord, Slo, Summary};
pub use run::{run, RunOptions, RunResult};
pub use workload::{Arrival, Endpoint, Length, Workload};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid workload: {0}")]
    Workload(String),
    #[error("{0}")]
    Setup(String),
}
