//! The seam every inference tier plugs into: a [`Backend`] takes a typed, validated
//! [`Generation`] and answers with a stream of [`Event`]s. The in-process engine
//! (`local::LocalBackend`) and an OpenAI-compatible server (`upstream::Upstream`) are two
//! implementations; the pipeline (`pipeline`) routes, governs, relays and measures them the
//! same way, so a third (a simulated accelerator, a CUDA engine) is one more implementation
//! and touches no route code.
//!
//! A generation has two steps on a backend. `prepare` renders the request the backend's way
//! (a chat template and tokenizer, a JSON body) and runs the checks that cost nothing to fail
//! (context length, queue room): it happens before the budget is reserved, so a request
//! refused there writes nothing to the ledger. `generate` then starts the work; `Ok` means the
//! backend accepted the request, and from then on its outcome is charged.

use std::any::Any;

use futures::stream::BoxStream;
use serrano_api as api;

use crate::error::ApiError;
use crate::params;

/// The endpoint a generation came through, with its body as the client sent it (after the
/// tenant's prompt filters redacted it). Backends read the fields they honour; an upstream gets
/// the body forwarded.
#[derive(Debug, Clone)]
pub enum Request {
    Chat(api::ChatCompletionRequest),
    Completion(api::CompletionRequest),
}

impl Request {
    /// Fields of the body that no typed field took, as sent.
    pub fn extra(&self) -> &api::Extra {
        match self {
            Request::Chat(r) => &r.extra,
            Request::Completion(r) => &r.extra,
        }
    }

    pub fn is_chat(&self) -> bool {
        matches!(self, Request::Chat(_))
    }
}

/// The roles OpenAI defines for chat messages; anything else would render into the prompt as
/// text of the caller's choosing where the template expects a role.
pub const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A request past validation: what every backend may rely on.
#[derive(Debug, Clone)]
pub struct Generation {
    pub request: Request,
    /// The model as the client names it (the route's first model when the request named none).
    pub model: String,
    /// `n`: choices per prompt.
    pub n: usize,
    /// Choices in the response: `n` for each prompt (a legacy completion may send several).
    pub choices: usize,
    pub stream: bool,
    /// Streams end with a usage chunk.
    pub include_usage: bool,
    /// Completion tokens per choice, as asked (`max_completion_tokens`, else `max_tokens`).
    pub max_tokens: Option<u64>,
    /// Alternatives to list per generated token, when log-probs were asked for.
    pub logprobs: Option<usize>,
    /// Sampling, validated against OpenAI's ranges.
    pub sampling: serrano_engine::SamplingParams,
    pub stop: Vec<String>,
    /// Who the request is for (fair scheduling is per tenant).
    pub tenant: String,
    /// Higher is admitted first (admin keys only).
    pub priority: i32,
    /// Its latency class in the engine's scheduler (the tenant's, or the request's header).
    pub class: serrano_engine::SloClass,
    /// Its latency targets in a local engine (its tenant's `slo`; `None`: the engine's own).
    pub ttft_target: Option<std::time::Duration>,
    pub itl_target: Option<std::time::Duration>,
    /// A traced request's local engine adds an event per token to its decode span (the
    /// tenant's `trace_tokens`, or the `x-serrano-trace-tokens` header).
    pub token_events: bool,
}

impl Generation {
    /// Validates what every backend relies on, once: `model` is the client's name for it,
    /// `tenant` whom it is for, `priority` its place in queues.
    pub fn new(
        request: Request,
        model: String,
        tenant: String,
        priority: i32,
    ) -> Result<Generation, ApiError> {
        let (sampling, max_tokens, logprobs, prompts) = match &request {
            Request::Chat(r) => {
                if r.messages.is_empty() {
                    return Err(ApiError::invalid_param(
                        "messages",
                        "messages must not be empty",
                    ));
                }
                if let Some((i, m)) = r
                    .messages
                    .iter()
                    .enumerate()
                    .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
                {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].role"),
                        format!(
                            "'{}' is not a role; one of {}",
                            m.role.chars().take(64).collect::<String>(),
                            ROLES.join(", ")
                        ),
                    ));
                }
                let logprobs = match (r.logprobs, r.top_logprobs) {
                    (false, Some(_)) => {
                        return Err(ApiError::invalid_param(
                            "top_logprobs",
                            "top_logprobs requires logprobs: true",
                        ))
                    }
                    (false, None) => None,
                    (true, n) => Some(("top_logprobs", n.unwrap_or(0) as usize)),
                };
                let max = r.max_completion_tokens.or(r.max_tokens);
                (&r.sampling, max, logprobs, 1)
            }
            Request::Completion(r) => {
                if r.prompt.count() == 0 {
                    return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
                }
                let logprobs = r.logprobs.map(|n| ("logprobs", n as usize));
                (&r.sampling, r.max_tokens, logprobs, r.prompt.count())
            }
        };
        if let Some((param, n)) = logprobs.filter(|(_, n)| *n > serrano_engine::MAX_LOGPROBS) {
            return Err(ApiError::invalid_param(
                param,
                format!(
                    "{param} must be at most {}, got {n}",
                    serrano_engine::MAX_LOGPROBS
                ),
            ));
        }
        if max_tokens == Some(0) {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let n = params::choices(sampling)?;
        params::stop_token_ids(sampling)?;
        Ok(Generation {
            model,
            n,
            choices: n.saturating_mul(prompts),
            stream: sampling.stream,
            include_usage: sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            max_tokens: max_tokens.map(u64::from),
            logprobs: logprobs.map(|(_, n)| n),
            sampling: params::sampling(sampling)?,
            stop: params::stops(sampling)?,
            tenant,
            priority,
            class: serrano_engine::SloClass::default(),
            ttft_target: None,
            itl_target: None,
            token_events: false,
            request,
        })
    }
}

/// A generation rendered for one backend, with what the reservation must cover.
pub struct Prepared {
    /// Prompt tokens: exact where the backend tokenizes, else an upper bound.
    pub prompt_tokens: u64,
    /// Completion tokens per choice the backend may generate.
    pub max_tokens: u64,
    /// The backend's own rendering (token ids, a JSON body), handed back to its `generate`.
    work: Box<dyn Any + Send>,
}

impl Prepared {
    pub fn new<T: Any + Send>(prompt_tokens: u64, max_tokens: u64, work: T) -> Prepared {
        Prepared {
            prompt_tokens,
            max_tokens,
            work: Box::new(work),
        }
    }

    /// The rendering `prepare` made, to read; `None` if it is of another type.
    pub fn work<T: Any>(&self) -> Option<&T> {
        self.work.downcast_ref::<T>()
    }

    /// The rendering `prepare` made; `Err` if it came from another backend's `prepare` (a bug).
    pub fn into_work<T: Any>(self) -> Result<T, BackendError> {
        self.work
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| BackendError::failed(ApiError::internal("a backend got another's work")))
    }
}

/// Why a backend did not take or finish a request, and what that says about it.
#[derive(Debug, Clone)]
pub struct BackendError {
    /// What the client is told, if no other backend serves the request.
    pub error: ApiError,
    pub fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Unreachable, failed, timed out, broke off: another backend may be tried, and it counts
    /// against this one's circuit breaker.
    Backend,
    /// Busy (a full queue, a 429): another backend may be tried; the backend is healthy.
    Busy,
    /// The request itself cannot be served (a 4xx): another backend would refuse it too.
    Request,
}

impl Fault {
    /// What the router learns about the backend from an attempt that ended this way.
    pub fn outcome(self) -> serrano_router::Outcome {
        match self {
            Fault::Backend => serrano_router::Outcome::Failed,
            // Alive: busy, or the request itself could not be served.
            Fault::Busy | Fault::Request => serrano_router::Outcome::Refused,
        }
    }
}

impl BackendError {
    pub fn failed(error: ApiError) -> BackendError {
        BackendError {
            error,
            fault: Fault::Backend,
        }
    }

    pub fn busy(error: ApiError) -> BackendError {
        BackendError {
            error,
            fault: Fault::Busy,
        }
    }

    pub fn refused(error: ApiError) -> BackendError {
        BackendError {
            error,
            fault: Fault::Request,
        }
    }

    /// Whether the next candidate of the plan may be tried.
    pub fn retryable(&self) -> bool {
        self.fault != Fault::Request
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        e.error
    }
}

/// Log-probs of a piece of a choice, in the shape of the request's endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Logprobs {
    Chat(Vec<api::ChatTokenLogprob>),
    Completion(api::CompletionLogprobs),
}

/// Text of one choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub index: u32,
    /// What may be shown now (it may be empty while a partial character is held back).
    pub text: String,
    /// One generated token, for the tally (an echoed prompt is not).
    pub generated: bool,
    pub logprobs: Option<Logprobs>,
    /// Fields of the choice's message or delta that serrano does not model (an upstream's
    /// `refusal`, `reasoning_content`, ...), passed through unless output filters are on.
    pub extra: api::Extra,
}

/// What a backend reports while it generates.
#[derive(Debug, Clone)]
pub enum Event {
    Delta(Delta),
    /// A piece of a tool call of choice `index` (`legacy`: OpenAI's older `function_call`).
    ToolCall {
        index: u32,
        call: api::ToolCallDelta,
        legacy: bool,
    },
    /// Choice `index` is complete; `extra` holds choice-level fields serrano does not model
    /// (vLLM's `stop_reason`, ...), passed through.
    Finish {
        index: u32,
        reason: String,
        extra: api::Extra,
    },
    /// The whole request's usage: the prompt counted once, completions of every choice.
    Usage {
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// Response-level fields serrano does not model (`system_fingerprint`, `service_tier`),
    /// passed through.
    Meta(api::Extra),
    /// The generation broke off; nothing follows.
    Error(BackendError),
}

/// A backend's events; the stream ends when the generation is complete (an `Error` first if
/// it is not). Dropping it cancels the generation.
pub type EventStream = BoxStream<'static, Event>;

/// What a backend needs to know about the attempt it serves.
pub struct AttemptCtx {
    /// When the whole request must be answered, across every attempt.
    pub deadline: tokio::time::Instant,
}

/// One inference tier behind the API. Implementations must be cheap to share (`Arc`).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The config's name for it (audit records, metrics, `x-serrano-backend`).
    fn name(&self) -> &str;

    /// What kind of tier it is, for the admin view (`local`, `openai`, ...).
    fn kind(&self) -> &'static str;

    /// The context length of one of its models, when known.
    fn context_length(&self, model: &str) -> Option<u64>;

    /// Whether each `Delta` with `generated` is exactly one generated token, so that a
    /// generation cut short is charged its tally; otherwise it is charged the whole
    /// reservation unless it reported its usage.
    fn exact_tally(&self) -> bool;

    /// Renders `gen` for `model` (the backend's own id for it) and checks what costs nothing
    /// to check: context, limits, queue room. Nothing is generated.
    async fn prepare(&self, gen: &Generation, model: &str) -> Result<Prepared, BackendError>;

    /// Starts generating; `Ok` means the backend accepted the request.
    async fn generate(
        &self,
        gen: &Generation,
        work: Prepared,
        ctx: &AttemptCtx,
    ) -> Result<EventStream, BackendError>;

    /// An active health check, for backends that have one (`None`: not checked).
    async fn health(&self) -> Option<Result<(), String>> {
        None
    }

    /// The in-process engine behind it, if any (`/tokenize`, `/detokenize`, `/metrics`).
    fn engine(&self) -> Option<&serrano_engine::EngineHandle> {
        None
    }

    /// What a backend with a scheduler of its own is doing (a simulated device), for
    /// `/metrics`; `None` for the others (a local engine reports through its own metrics).
    fn load(&self) -> Option<serrano_sim::live::Load> {
        None
    }

    /// `/tokenize` by the backend itself, for a remote one that has vLLM's route (serrano,
    /// vLLM): `req.model` is already the backend's own id. `None`: it has no such route.
    async fn tokenize(
        &self,
        _req: &api::TokenizeRequest,
    ) -> Option<Result<api::TokenizeResponse, BackendError>> {
        None
    }
}
