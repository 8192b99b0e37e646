//! serrano's inference engine for Llama-family GGUF models.
//!
//! Data flow: [`gguf`] maps the file; [`model`] builds the transformer over the mapped weights
//! ([`quant`] formats, [`ops`] kernels); [`tokenizer`] and [`chat`] turn text into tokens;
//! [`engine`] runs a thread that batches requests arriving over a bounded channel
//! ([`scheduler`] plans each step over the [`paged`] KV cache, which the model sees through
//! [`kv`]), samples ([`sampling`]) and streams events back, counting what it does in
//! [`metrics`]; [`steptime`] learns what a step costs, and the scheduler sizes steps by it.
//! Nothing here knows about HTTP.

pub mod calibrate;
pub mod chat;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pacing;
pub mod packed;
pub mod paged;
pub mod quant;
pub mod roofline;
pub mod sampling;
pub mod scheduler;
pub mod steptime;
pub mod stop;
/// Test fixtures, for this crate's tests and, through the `testing` feature, other crates'.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

pub use chat::ChatMessage;
pub use constraint::{Constraint, ConstraintFactory, TokenConstraint, TokenMask};
pub use engine::{
    start, start_from_gguf, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest,
    ModelInfo, SubmitError, Timing, TokenStep, MAX_LOGPROBS,
};
pub use error::{EngineError, Result};
pub use sampling::{SamplingParams, TokenLogprobs};
pub use scheduler::{SloClass, StepCaps, Urgency};
