//! The engine thread: requests arrive over a bounded channel; every step the scheduler picks
//! chunks of tokens from the running sequences (decodes first, then prefill chunks, then newly
//! admitted ones) under a token budget, one forward pass runs them all over the paged KV cache,
//! and each sequence streams its events back over its own channel.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::calibrate;
use crate::chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
use crate::constraint::{Constraint, TokenConstraint};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::metrics::{self, EngineMetrics};
use crate::model::{LogitsWanted, Model, ModelConfig, SeqStep};
use crate::pacing::{Asks, Pacing};
use crate::paged::{KvStorage, SharedAllocator, BLOCK_TOKENS};
use crate::sampling::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use crate::scheduler::{self, Planned, Scheduler, SchedulerConfig, SeqId, SloClass, StepCaps};
use crate::steptime::{StepModel, StepShape};
use crate::stop::StopMatcher;
use crate::tokenizer::{Tokenizer, Utf8Stream};

/// Private-use characters that mark message content in a rendered chat (see
/// [`ModelInfo::chat_prompt`]); no tokenizer gives them meaning, and user text never keeps them.
const USER_TEXT_START: char = '\u{E000}';
const USER_TEXT_END: char = '\u{E001}';

/// Most log-probabilities one position may list (OpenAI allows 20).
pub const MAX_LOGPROBS: usize = 20;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests queued for the engine; beyond this `submit` refuses (backpressure).
    pub max_waiting: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one step.
    pub max_batch_tokens: usize,
    /// Memory for the KV block pool, allocated once at start-up.
    pub kv_cache_bytes: usize,
    /// Context length used, at most the model's own.
    pub max_context: Option<usize>,
    /// Name under which metrics are labelled (`model_name`).
    pub model_name: String,
    /// Reuse the KV blocks of earlier prompts' shared prefixes (automatic prefix caching).
    pub prefix_caching: bool,
    /// The inter-token latency decoding sequences are kept within: each step's prompt tokens
    /// are capped so the step-time model predicts a step of at most [`STEP_SHARE`](crate::pacing::STEP_SHARE) of it
    /// (Sarathi-Serve's stall-free batching). `None`: steps take `max_batch_tokens` whatever
    /// the decodes wait.
    pub itl_target: Option<Duration>,
    /// Appends one JSON line per step (its shape, measured and predicted seconds) here.
    pub step_log: Option<std::path::PathBuf>,
    /// Time a few steps of chosen shapes at start-up (at most
    /// [`CALIBRATION_TIME`](crate::calibrate::CALIBRATION_TIME)), so the step-time model caps
    /// steps from the first request.
    pub calibrate: bool,
}

/// What a request asks of pacing.
fn asks(req: &GenerateRequest) -> Asks {
    Asks {
        class: req.class,
        priority: req.priority,
        ttft_target: req.ttft_target,
        itl_target: req.itl_target,
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_waiting: 64,
            max_num_seqs: 32,
            max_batch_tokens: 256,
            kv_cache_bytes: 1 << 30,
            max_context: None,
            model_name: "default".into(),
            prefix_caching: true,
            itl_target: Some(Duration::from_millis(100)),
            step_log: None,
            calibrate: true,
        }
    }
}

/// What a caller asks of the engine: token ids in, events out.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep generating through end-of-generation tokens (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// Report the chosen token's log-prob and this many alternatives per generated token.
    pub logprobs: Option<usize>,
    /// Report log-probs for every prompt token (needs logits at every prompt position).
    pub prompt_logprobs: Option<usize>,
    /// Who the request is for: scheduling is fair across tenants.
    pub tenant: String,
    /// Higher is admitted first.
    pub priority: i32,
    /// Its latency class: interactive (the default) is admitted first and keeps the
    /// inter-token target; batch takes what is left.
    pub class: SloClass,
    /// An interactive request's own latency targets (its tenant's `slo`): the first token by
    /// `ttft_target` (default [`INTERACTIVE_TTFT_TARGET`](crate::pacing::INTERACTIVE_TTFT_TARGET)), then tokens at most `itl_target`
    /// apart (default the engine's `itl_target`), which caps the steps it decodes in. Batch
    /// requests have none.
    pub ttft_target: Option<Duration>,
    pub itl_target: Option<Duration>,
    /// Which tokens each choice may sample (a JSON schema, a grammar); `None`: any.
    pub constraint: Option<Constraint>,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            tenant: "default".into(),
            priority: 0,
            class: SloClass::Interactive,
            ttft_target: None,
            itl_target: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token, stop token or stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One entry per prompt token; the first is `None` (nothing predicts it).
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// A generated token. `text` is what may be shown now: it can be empty while a partial
    /// UTF-8 character or a possible stop string is held back, or hold text of earlier tokens.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
        /// When it was sampled and what the step that computed it held.
        step: TokenStep,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        timing: Timing,
    },
    Error(String),
}

/// The engine step a token came from, so a trace can show where an inter-token gap came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenStep {
    /// When the token was sampled.
    pub at: Instant,
    /// The engine's step number (counted from its start).
    pub index: u64,
    /// When the step began.
    pub started: Instant,
    /// Sequences in the step.
    pub seqs: u32,
    /// Of them, those decoding one token.
    pub decode_seqs: u32,
    /// Prompt tokens computed in the step (chunks of prompts, recomputed preempted tokens).
    pub prefill_tokens: u32,
}

/// When a finished sequence's phases began and ended, on the engine's clock (for traces: queue,
/// prefill, decode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Submitted.
    pub arrival: Instant,
    /// The first step that held it began (its wait in the queue ends).
    pub scheduled: Option<Instant>,
    /// Its first token was sampled (its prefill ends).
    pub first_token: Option<Instant>,
    /// Its last token was sampled.
    pub finished: Instant,
    /// Steps that computed part of its prompt (chunks, and any recomputed after preemption).
    pub prefill_steps: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the engine queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("tenant '{tenant}' already has {limit} requests in flight")]
    TenantBusy { tenant: String, limit: usize },
    #[error("batch requests already hold their share of the engine ({0} in flight; interactive requests still get in)")]
    BatchBusy(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    Invalid(String),
}

/// Facts about the loaded model the front end needs (limits, tokenizer, template).
pub struct ModelInfo {
    pub config: ModelConfig,
    /// Tokens the KV block pool holds in all.
    pub kv_cache_tokens: usize,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub context_length: usize,
    pub weight_bytes: usize,
    /// The output head is a matrix of its own (its bytes count in `weight_bytes`).
    pub untied_head: bool,
    /// Whether prompts go through the prefix cache (`--no-prefix-caching` turns it off).
    pub prefix_caching: bool,
}

impl ModelInfo {
    /// Longest prompt text worth tokenizing: anything longer has more tokens than the context.
    pub fn max_prompt_bytes(&self) -> usize {
        self.context_length
            .saturating_mul(self.tokenizer.max_token_bytes)
    }

    /// Renders a chat and tokenizes it, no BOS added (templates that want one write it
    /// themselves). Special tokens the template writes are parsed; special-token strings inside
    /// message content stay text, so a user cannot forge a turn by typing `<|im_end|>`: each
    /// content is wrapped in private-use markers before rendering, and the tokenizer parses
    /// special tokens only outside them.
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: format!(
                    "{USER_TEXT_START}{}{USER_TEXT_END}",
                    // Markers typed by the user would open or close a span themselves.
                    m.content
                        .replace([USER_TEXT_START, USER_TEXT_END], "\u{FFFD}")
                ),
            })
            .collect();
        let text = self.chat_template.render(&marked, add_generation_prompt)?;
        Ok(self
            .tokenizer
            .encode_marked(&text, USER_TEXT_START, USER_TEXT_END))
    }
}

struct Submission {
    req: GenerateRequest,
    /// When the request was submitted: TTFT and queue time count from here, so time spent in
    /// the submission channel while a step runs is not hidden (vLLM counts from arrival too).
    submitted: Instant,
    events: mpsc::Sender<Event>,
    /// Held for the request's whole life (it moves into the engine's entry).
    _slot: TenantSlot,
    /// Further choices of the same prompt (`n > 1`): they start once this one has computed
    /// the prompt, sharing its KV blocks.
    siblings: Vec<Sibling>,
}

/// A choice waiting for its leader's prompt.
struct Sibling {
    req: GenerateRequest,
    events: mpsc::Sender<Event>,
    slot: TenantSlot,
}

/// Requests in flight per tenant, queued or running. One tenant may hold at most half the
/// waiting list plus every sequence slot (`max_waiting / 2 + max_num_seqs`), so a flood from one
/// tenant leaves half the submission queue, and the router's concurrency limit in front of it
/// (256 by default, under the 288 a tenant could otherwise hold), to the others.
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<std::collections::HashMap<String, usize>>);

/// One request's claim on its tenant's in-flight count (and, for a batch request, on the
/// batch class's), released on drop (finish, cancel, error, or a refused submission).
#[derive(Debug)]
struct TenantSlot {
    in_flight: Arc<InFlight>,
    keys: Vec<String>,
}

/// The in-flight count of batch requests, beside the tenants' (no tenant name holds a NUL).
const BATCH_KEY: &str = "\0batch";

impl InFlight {
    /// Claims a place for a request of `tenant` (at most `limit` in flight) and, for a batch
    /// request, one of the batch class's `batch_limit`; both or neither.
    fn claim(
        self: &Arc<Self>,
        tenant: &str,
        limit: usize,
        batch_limit: Option<usize>,
    ) -> Result<TenantSlot, SubmitError> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(tenant).copied().unwrap_or(0) >= limit {
            return Err(SubmitError::TenantBusy {
                tenant: tenant.to_string(),
                limit,
            });
        }
        let mut keys = vec![tenant.to_string()];
        if let Some(batch) = batch_limit {
            if m.get(BATCH_KEY).copied().unwrap_or(0) >= batch {
                return Err(SubmitError::BatchBusy(batch));
            }
            keys.push(BATCH_KEY.to_string());
        }
        for k in &keys {
            *m.entry(k.clone()).or_insert(0) += 1;
        }
        Ok(TenantSlot {
            in_flight: self.clone(),
            keys,
        })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut m = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    // Keeps the map to the tenants with work: names come from clients.
                    m.remove(k);
                }
            }
        }
    }
}

/// Cheap to clone; the engine thread stops when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    in_flight: Arc<InFlight>,
    per_tenant_limit: usize,
    info: Arc<ModelInfo>,
    metrics: Arc<EngineMetrics>,
    max_waiting: usize,
    started: Arc<Started>,
}

/// Set by the engine thread once its start-up (the step-time calibration) is done and it
/// takes requests.
#[derive(Default)]
struct Started {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Started {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }
}

impl EngineHandle {
    /// Waits, at most `timeout`, until the engine thread has finished its start-up
    /// calibration and takes requests; whether it has. A server waits on this before it
    /// listens, so its first request does not queue behind the calibration.
    pub fn wait_started(&self, timeout: Duration) -> bool {
        let done = self.started.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .started
            .changed
            .wait_timeout_while(done, timeout, |d| !*d)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }

    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    pub fn metrics(&self) -> &Arc<EngineMetrics> {
        &self.metrics
    }

    /// Checks that the engine answers: one token of a one-token prompt, greedy, whose
    /// log-probability must be finite (weights that load but compute NaN fail here). Blocks the
    /// calling thread (call it off async workers), for one prefill step of the model.
    pub fn verify(&self) -> Result<(), String> {
        let mut req = GenerateRequest::new(vec![0], 1);
        req.ignore_eos = true;
        req.logprobs = Some(0);
        req.sampling.temperature = 0.0;
        let mut rx = self.submit(req).map_err(|e| e.to_string())?;
        let mut answered = false;
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Token { logprobs, .. } => {
                    let lp = logprobs.map_or(f32::NAN, |l| l.logprob);
                    if !lp.is_finite() {
                        return Err(format!("the model's first token has log-probability {lp}"));
                    }
                    answered = true;
                }
                Event::Error(e) => return Err(e),
                Event::Finished { .. } if answered => return Ok(()),
                _ => {}
            }
        }
        Err("the engine stopped before it answered".into())
    }

    /// Queues a request; fails at once (never blocks) when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        let mut rxs = self.submit_n(vec![req])?;
        Ok(rxs.remove(0))
    }

    /// Queues the choices of one prompt (`n` of an OpenAI request, each with its own sampling
    /// and limits): the prompt is computed once, by the first, and the others start from its
    /// KV blocks (all but the last partial block, which each recomputes). All or none are
    /// queued. Requests with prompt log-probs compute the prompt each (every position's
    /// logits are wanted).
    pub fn submit_n(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Result<Vec<mpsc::Receiver<Event>>, SubmitError> {
        let Some(first) = reqs.first() else {
            return Ok(Vec::new());
        };
        if reqs
            .iter()
            .any(|r| r.prompt != first.prompt || r.tenant != first.tenant)
        {
            return Err(SubmitError::Invalid(
                "the choices of one request share its prompt and tenant".into(),
            ));
        }
        let share = reqs.iter().all(|r| r.prompt_logprobs.is_none());
        let mut subs = Vec::with_capacity(reqs.len());
        let mut rxs = Vec::with_capacity(reqs.len());
        for req in reqs {
            self.validate(&req)?;
            let slot =
                self.in_flight
                    .claim(&req.tenant, self.per_tenant_limit, self.batch_limit(&req))?;
            // Every event of this request fits: one per token, the prompt log-probs, the end.
            let (tx, rx) = mpsc::channel(req.max_tokens + 3);
            rxs.push(rx);
            subs.push((req, tx, slot));
        }
        let submitted = Instant::now();
        let send = |s: Submission| {
            self.tx.try_send(s).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.max_waiting),
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })
        };
        let mut subs = subs.into_iter();
        if share {
            let Some((req, events, _slot)) = subs.next() else {
                return Ok(rxs);
            };
            let siblings = subs
                .map(|(req, events, slot)| Sibling { req, events, slot })
                .collect();
            send(Submission {
                req,
                submitted,
                events,
                _slot,
                siblings,
            })?;
        } else {
            // Dropping the receivers of those already queued cancels them if one is refused.
            for (req, events, _slot) in subs {
                send(Submission {
                    req,
                    submitted,
                    events,
                    _slot,
                    siblings: Vec::new(),
                })?;
            }
        }
        Ok(rxs)
    }

    /// Whether `submit_n` of `choices` requests for `tenant` would find room now (queue slots
    /// and the tenant's in-flight share), and that `req` is one the engine can run. Nothing is
    /// claimed: a caller checks this before costlier steps (a budget reservation), and the
    /// submission itself still decides.
    pub fn check(&self, req: &GenerateRequest, choices: usize) -> Result<(), SubmitError> {
        self.validate(req)?;
        // The choices of one prompt go as one submission unless each computes its prompt.
        let slots = if req.prompt_logprobs.is_some() {
            choices
        } else {
            1
        };
        if self.tx.capacity() < slots {
            return Err(SubmitError::QueueFull(self.max_waiting));
        }
        let m = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&req.tenant).copied().unwrap_or(0) + choices > self.per_tenant_limit {
            return Err(SubmitError::TenantBusy {
                tenant: req.tenant.clone(),
                limit: self.per_tenant_limit,
            });
        }
        if let Some(batch) = self.batch_limit(req) {
            if m.get(BATCH_KEY).copied().unwrap_or(0) + choices > batch {
                return Err(SubmitError::BatchBusy(batch));
            }
        }
        Ok(())
    }

    /// Most batch requests in flight: half the waiting list, so a batch flood always leaves
    /// the engine's queue room for interactive requests (which are admitted first).
    fn batch_limit(&self, req: &GenerateRequest) -> Option<usize> {
        (req.class == SloClass::Batch).then_some((self.max_waiting / 2).max(1))
    }

    /// What [`check`](Self::check) checks of the request itself (prompt, context, KV cache,
    /// vocabulary), without the queue room.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(), SubmitError> {
        let ctx = self.info.context_length;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        if req.prompt.len() + req.max_tokens > ctx {
            return Err(SubmitError::Invalid(format!(
                "this model's maximum context length is {ctx} tokens; the prompt has {} tokens and max_tokens is {}",
                req.prompt.len(),
                req.max_tokens
            )));
        }
        let need = (req.prompt.len() + req.max_tokens).div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS;
        if need > self.info.kv_cache_tokens {
            return Err(SubmitError::Invalid(format!(
                "the prompt ({} tokens) plus max_tokens ({}) can never fit the KV cache ({} tokens; see --kv-cache-memory)",
                req.prompt.len(),
                req.max_tokens,
                self.info.kv_cache_tokens
            )));
        }
        let vocab = self.info.config.vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        if req.logprobs.unwrap_or(0) > MAX_LOGPROBS
            || req.prompt_logprobs.unwrap_or(0) > MAX_LOGPROBS
        {
            return Err(SubmitError::Invalid(format!(
                "at most {MAX_LOGPROBS} log-probabilities per position"
            )));
        }
        Ok(())
    }
}

/// Loads a GGUF and starts the engine thread.
pub fn start(path: &std::path::Path, config: EngineConfig) -> Result<EngineHandle> {
    let file = GgufFile::open(path)?;
    start_from_gguf(&file, config)
}

pub fn start_from_gguf(file: &GgufFile, config: EngineConfig) -> Result<EngineHandle> {
    let model = Model::load(file)?;
    let tokenizer = Tokenizer::from_gguf(file)?;
    if tokenizer.vocab_size() != model.config.vocab_size {
        return Err(EngineError::Invalid(format!(
            "tokenizer has {} tokens, the model {}",
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    let template_src = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .unwrap_or(CHATML_TEMPLATE);
    let name = |id: Option<u32>| id.map(|t| tokenizer.token_text(t)).unwrap_or_default();
    let chat_template =
        ChatTemplate::new(template_src, &name(tokenizer.bos), &name(tokenizer.eos))?;
    let context_length = config.max_context.map_or(model.config.context_length, |c| {
        c.min(model.config.context_length)
    });
    let block_bytes = KvStorage::block_bytes(model.config.n_layers, model.config.kv_width());
    let n_blocks = config.kv_cache_bytes / block_bytes;
    if n_blocks == 0 {
        return Err(EngineError::Invalid(format!(
            "the KV cache budget ({} bytes) holds no block of {block_bytes} bytes",
            config.kv_cache_bytes
        )));
    }
    // A context the pool cannot hold would make every default-length chat a 400.
    let kv_cache_tokens = n_blocks * BLOCK_TOKENS;
    if kv_cache_tokens < context_length {
        tracing::warn!(
            context_length,
            kv_cache_tokens,
            "context length reduced to what the KV cache holds; raise --kv-cache-memory for more"
        );
    }
    let context_length = context_length.min(kv_cache_tokens);
    let info = Arc::new(ModelInfo {
        config: model.config.clone(),
        kv_cache_tokens,
        tokenizer,
        chat_template,
        context_length,
        weight_bytes: model.weight_bytes(),
        untied_head: model.untied_head(),
        prefix_caching: config.prefix_caching,
    });
    tracing::info!(
        blocks = n_blocks,
        tokens = n_blocks * BLOCK_TOKENS,
        mib = (n_blocks * block_bytes) >> 20,
        "KV cache allocated (f16, {BLOCK_TOKENS} tokens per block)"
    );
    let metrics = Arc::new(EngineMetrics::new(&config.model_name));
    let step_log = match &config.step_log {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    EngineError::Invalid(format!(
                        "cannot open the step log {}: {e}",
                        path.display()
                    ))
                })?,
        )),
        None => None,
    };
    let (tx, rx) = mpsc::channel(config.max_waiting.max(1));
    let started = Arc::new(Started::default());
    let alloc = SharedAllocator::new(n_blocks);
    let sched_cfg = SchedulerConfig {
        max_num_seqs: config.max_num_seqs.max(1),
        max_batch_tokens: config.max_batch_tokens.max(1),
    };
    let worker = Worker {
        storage: KvStorage::new(model.config.n_layers, model.config.kv_width(), n_blocks),
        model,
        info: info.clone(),
        rx,
        sched: Scheduler::new(sched_cfg, alloc),
        max_waiting: config.max_waiting.max(1),
        prefix_caching: config.prefix_caching,
        metrics: metrics.clone(),
        next_id: 0,
        in_step: Vec::new(),
        labelled_tenants: Default::default(),
        steps: StepModel::default(),
        pacing: Pacing::new(config.itl_target),
        step_log,
        epoch: Instant::now(),
        calibrate: config.calibrate,
        step_count: 0,
        this_step: None,
        model_name: config.model_name.clone(),
        started: started.clone(),
    };
    thread::Builder::new()
        .name("serrano-engine".into())
        .spawn(move || worker.run())
        .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
    Ok(EngineHandle {
        in_flight: Arc::default(),
        per_tenant_limit: (config.max_waiting / 2).max(1) + config.max_num_seqs.max(1),
        tx,
        info,
        metrics,
        max_waiting: config.max_waiting,
        started,
    })
}

/// What the engine keeps per sequence beside the scheduler's state.
struct Payload {
    _slot: TenantSlot,
    /// Metric labels of the request's tenant, computed once at admission.
    labels: Vec<(String, String)>,
    req: GenerateRequest,
    events: mpsc::Sender<Event>,
    sampler: Sampler,
    utf8: Utf8Stream,
    stop: StopMatcher,
    generated: usize,
    /// Prompt log-probs gathered chunk by chunk until the prompt is done.
    prompt_lp: Option<Vec<Option<TokenLogprobs>>>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    prefill_steps: u32,
    failed: bool,
    /// Choices that start from this sequence's prompt once it is computed.
    siblings: Vec<Sibling>,
    /// This sequence's own constraint, started from the request's.
    constraint: Option<Box<dyn TokenConstraint>>,
}

impl Payload {
    fn new(
        req: GenerateRequest,
        arrival: Instant,
        events: mpsc::Sender<Event>,
        slot: TenantSlot,
        labels: Vec<(String, String)>,
    ) -> Payload {
        Payload {
            constraint: req.constraint.as_ref().map(|c| c.0.start()),
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            stop: StopMatcher::new(req.stop.clone()),
            utf8: Utf8Stream::default(),
            generated: 0,
            prompt_lp: req.prompt_logprobs.map(|_| vec![None]),
            arrival,
            first_scheduled: None,
            first_token: None,
            last_token: None,
            prefill_steps: 0,
            failed: false,
            events,
            _slot: slot,
            labels,
            req,
            siblings: Vec::new(),
        }
    }

    /// Fails this sequence and the choices waiting for it.
    fn fail(&mut self, msg: &str) {
        let _ = self.events.try_send(Event::Error(msg.to_string()));
        for s in self.siblings.drain(..) {
            let _ = s.events.try_send(Event::Error(msg.to_string()));
        }
        self.failed = true;
    }
}

struct Worker {
    model: Model,
    storage: KvStorage,
    info: Arc<ModelInfo>,
    rx: mpsc::Receiver<Submission>,
    sched: Scheduler<Payload>,
    max_waiting: usize,
    prefix_caching: bool,
    metrics: Arc<EngineMetrics>,
    next_id: SeqId,
    /// Sequences of the step in progress (to fail just those if it panics).
    in_step: Vec<SeqId>,
    /// Tenants that have their own metric label; later ones share `other`.
    labelled_tenants: std::collections::HashSet<String>,
    /// What a step costs here, learned from every step.
    steps: StepModel,
    /// Requests' urgency and steps' caps (shared with the simulator).
    pacing: Pacing,
    step_log: Option<std::io::BufWriter<std::fs::File>>,
    /// Zero of the scheduler's deadlines (microseconds from here).
    epoch: Instant,
    calibrate: bool,
    /// Steps run so far; the step in progress, for the tokens it samples.
    step_count: u64,
    this_step: Option<TokenStep>,
    /// Its `model_name`, for the log.
    model_name: String,
    started: Arc<Started>,
}

impl Worker {
    fn run(mut self) {
        if self.calibrate {
            self.calibrate();
        }
        self.started.set();
        loop {
            if self.sched.is_idle() {
                match self.rx.blocking_recv() {
                    Some(s) => self.admit(s),
                    None => {
                        // Every handle is gone (a config stopped naming this model and its
                        // last requests ended): the weights and KV pool are freed on return.
                        tracing::info!(model = %self.model_name, "engine stopped");
                        return;
                    }
                }
            }
            // Take new requests only while the engine's own queue has room: the channel stays
            // the bound, so a flood is refused at submission instead of buffered here.
            while self.sched.num_waiting() < self.max_waiting {
                match self.rx.try_recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => break,
                }
            }
            // Clients that went away: dropping their entries frees their blocks.
            let gone = self
                .sched
                .drain_where(|e| e.payload.events.is_closed() || e.payload.failed);
            drop(gone);
            // A bug that panics inside a step fails that step's requests, not the whole server.
            if let Err(panic) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()))
            {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("engine step panicked: {msg}");
                // Only the sequences in that step fail; queued ones never reached the bug.
                let in_step = std::mem::take(&mut self.in_step);
                for mut e in self.sched.drain_where(|e| in_step.contains(&e.id)) {
                    e.payload.fail(&format!("internal engine error: {msg}"));
                }
            }
            self.update_gauges();
        }
    }

    fn admit(&mut self, s: Submission) {
        let id = self.next_id;
        self.next_id += 1;
        let req = s.req;
        let max_len = req.prompt.len() + req.max_tokens;
        let labels = tenant_label(&mut self.labelled_tenants, &req.tenant);
        let mut payload = Payload::new(req, s.submitted, s.events, s._slot, labels);
        payload.siblings = s.siblings;
        let urgency = self.pacing.urgency(
            &asks(&payload.req),
            s.submitted.saturating_duration_since(self.epoch),
            self.epoch.elapsed(),
        );
        let (tenant, prompt) = (
            Arc::from(payload.req.tenant.as_str()),
            payload.req.prompt.clone(),
        );
        // Prompt log-probs need logits at every prompt position: no prefix reuse for those.
        let cacheable = self.prefix_caching && payload.prompt_lp.is_none();
        self.sched
            .add(id, tenant, urgency, prompt, max_len, cacheable, payload);
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.num_requests_running.set(self.sched.num_running() as i64);
        m.num_requests_waiting.set(self.sched.num_waiting() as i64);
        let unfilled = self.sched.unfilled_slots();
        let a = self.sched.allocator().lock();
        m.kv_cache_usage_perc
            .set(a.used() as f64 / a.total().max(1) as f64);
        let slots = a.used() * BLOCK_TOKENS;
        m.kv_cache_waste_perc.set(if slots == 0 {
            0.0
        } else {
            unfilled as f64 / slots as f64
        });
    }

    /// The next step's prompt-token caps ([`Pacing::caps`]), priced by this engine's
    /// step-time model, on its clock.
    fn step_caps(&self) -> StepCaps {
        self.pacing
            .caps(&self.sched, &self.steps, self.epoch.elapsed())
    }

    /// Teaches the step-time model a few timed steps before the first request (requests
    /// arriving meanwhile wait in the channel).
    fn calibrate(&mut self) {
        let cfg = self.sched.config();
        let limits = (
            cfg.max_num_seqs,
            cfg.max_batch_tokens,
            self.info.context_length,
        );
        let alloc = self.sched.allocator().clone();
        let steps = calibrate::calibrate(&self.model, &mut self.storage, &alloc, limits);
        let n = steps.len();
        for (plan, seconds) in steps {
            self.learn(scheduler::step_shape(&plan), seconds, true);
        }
        tracing::info!(steps = n, "step-time model calibrated");
    }

    /// Learns from a step of `shape` that took `seconds` (a calibration step, or a real one), and
    /// logs it.
    fn learn(&mut self, shape: StepShape, seconds: f64, calibration: bool) {
        let predicted = self.steps.predict(shape);
        if calibration {
            self.steps.observe_pinned(shape, seconds);
        } else {
            self.steps.observe(shape, seconds);
        }
        let m = &self.metrics;
        m.step_seconds.observe(seconds);
        if let Some(e) = self.steps.last_error {
            m.step_time_error_ratio.set(e);
        }
        if let Some(c) = self.steps.coefficients() {
            for (term, v) in ["intercept", "prefill_token", "decode_seq", "kv_kilotoken"]
                .iter()
                .zip(c)
            {
                m.step_time_model
                    .get_or_create(&vec![("term".to_string(), term.to_string())])
                    .set(v);
            }
        }
        if let Some(log) = &mut self.step_log {
            let line = serde_json::json!({
                "t": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
                "prefill_tokens": shape.prefill_tokens,
                "decode_seqs": shape.decode_seqs,
                "kv_tokens": shape.kv_tokens,
                "seconds": seconds,
                "predicted": predicted,
                "calibration": calibration,
            });
            if writeln!(log, "{line}").and_then(|()| log.flush()).is_err() {
                tracing::warn!("cannot write the step log; it stops here");
                self.step_log = None;
            }
        }
    }

    fn step(&mut self) {
        let before = self.sched.stats;
        let started = Instant::now();
        let caps = self.step_caps();
        let plan = self.sched.schedule_within(caps);
        self.in_step = plan.iter().map(|p| p.id).collect();
        let after = self.sched.stats;
        self.metrics
            .num_preemptions
            .inc_by(after.preemptions - before.preemptions);
        self.metrics
            .steps_capped
            .inc_by(after.capped_steps - before.capped_steps);
        self.metrics
            .batch_decode_sit_outs
            .inc_by(after.batch_sit_outs - before.batch_sit_outs);
        self.metrics
            .prefix_cache_queries
            .inc_by(after.prefix_queries - before.prefix_queries);
        self.metrics
            .prefix_cache_hits
            .inc_by(after.prefix_hits - before.prefix_hits);
        if plan.is_empty() {
            // Nothing runnable (all waiting on blocks that running sequences will free): wait a
            // little for a new request instead of spinning.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        self.metrics
            .iteration_tokens_total
            .observe(plan.iter().map(|p| p.len).sum::<usize>() as f64);
        let shape = scheduler::step_shape(&plan);
        self.step_count += 1;
        self.this_step = Some(TokenStep {
            at: started,
            index: self.step_count,
            started,
            seqs: plan.len() as u32,
            decode_seqs: shape.decode_seqs as u32,
            prefill_tokens: shape.prefill_tokens as u32,
        });
        let now = Instant::now();
        let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
        let mut wants = Vec::with_capacity(plan.len());
        for p in &plan {
            let Some(e) = self.sched.get_mut(p.id) else {
                continue;
            };
            let pl = &mut e.payload;
            if pl.first_scheduled.is_none() {
                pl.first_scheduled = Some(now);
                let t = &pl.labels;
                self.metrics
                    .request_queue_time_seconds
                    .get_or_create(t)
                    .observe((now - pl.arrival).as_secs_f64());
                self.metrics
                    .prompt_tokens
                    .get_or_create(t)
                    .inc_by(pl.req.prompt.len() as u64);
            }
            let in_prompt = p.start < pl.req.prompt.len();
            if in_prompt {
                pl.prefill_steps += 1;
            }
            wants.push(if pl.prompt_lp.is_some() && in_prompt {
                LogitsWanted::All
            } else if p.samples {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            });
            inputs.push(e.tokens[p.start..p.start + p.len].to_vec());
        }
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .zip(&inputs)
            .zip(&wants)
            .map(|((p, t), &w)| SeqStep {
                tokens: t,
                start: p.start,
                logits: w,
            })
            .collect();
        let tables: Vec<Vec<u32>> = plan
            .iter()
            .map(|p| {
                self.sched
                    .get_mut(p.id)
                    .map(|e| e.table.blocks().to_vec())
                    .unwrap_or_default()
            })
            .collect();
        let result = self.model.forward_paged(&mut self.storage, &tables, &steps);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for p in &plan {
                    if let Some(en) = self.sched.get_mut(p.id) {
                        en.payload.fail(&e.to_string());
                    }
                }
                return;
            }
        };
        self.sched.after_step();
        let vocab = self.model.config.vocab_size;
        for ((p, rows), want) in plan.iter().zip(logits).zip(wants) {
            if want == LogitsWanted::All {
                self.gather_prompt_logprobs(p, &rows, vocab);
            }
            if p.samples && !rows.is_empty() {
                let mut last = rows[rows.len() - vocab..].to_vec();
                self.sample(p.id, &mut last);
            }
        }
        self.learn(shape, started.elapsed().as_secs_f64(), false);
    }

    /// Prompt log-probs from a chunk's rows: row `i` (position `start + i`) predicts the token
    /// at `start + i + 1`.
    fn gather_prompt_logprobs(&mut self, p: &Planned, rows: &[f32], vocab: usize) {
        let Some(e) = self.sched.get_mut(p.id) else {
            return;
        };
        let pl = &mut e.payload;
        let (n, prompt) = (pl.req.prompt_logprobs.unwrap_or(0), &pl.req.prompt);
        let Some(lp) = pl.prompt_lp.as_mut() else {
            return;
        };
        for (i, row) in rows.chunks_exact(vocab).enumerate() {
            let next = p.start + i + 1;
            if next < prompt.len() && next == lp.len() {
                lp.push(Some(logprobs(row, prompt[next], n)));
            }
        }
        if lp.len() == prompt.len() {
            let done = pl.prompt_lp.take().unwrap_or_default();
            send(pl, Event::PromptLogprobs(done));
        }
    }

    /// Starts the choices waiting for sequence `id`, whose prompt is now computed: each
    /// shares its full blocks and computes only the rest of the prompt (under 16 tokens).
    fn start_siblings(&mut self, id: SeqId) {
        let Some(e) = self.sched.get_mut(id) else {
            return;
        };
        let siblings = std::mem::take(&mut e.payload.siblings);
        let arrival = e.payload.arrival;
        let labels = e.payload.labels.clone();
        for s in siblings {
            let new_id = self.next_id;
            self.next_id += 1;
            let payload = Payload::new(s.req, arrival, s.events, s.slot, labels.clone());
            let max_len = payload.req.prompt.len() + payload.req.max_tokens;
            self.sched.fork(id, new_id, max_len, payload);
        }
    }

    /// Samples the next token of a sequence and decides whether it is finished.
    fn sample(&mut self, id: SeqId, logits: &mut [f32]) {
        let info = self.info.clone();
        if self
            .sched
            .get_mut(id)
            .is_some_and(|e| !e.payload.siblings.is_empty())
        {
            self.start_siblings(id);
        }
        let Some(e) = self.sched.get_mut(id) else {
            return;
        };
        let total_len = e.tokens.len();
        let s = &mut e.payload;
        let raw = s.req.logprobs.map(|_| logits.to_vec());
        if let Some(c) = &mut s.constraint {
            let started = Instant::now();
            let allowed = c.allowed();
            self.metrics
                .constraint_mask_seconds
                .observe(started.elapsed().as_secs_f64());
            match allowed {
                Ok(mask) => crate::constraint::apply(&mask, logits),
                Err(e) => {
                    s.fail(&format!("the output constraint failed: {e}"));
                    return;
                }
            }
        }
        let token = s.sampler.sample(logits);
        let constrained = match &mut s.constraint {
            Some(c) => match c.accept(token) {
                Ok(()) => c.complete(),
                Err(e) => {
                    s.fail(&format!("the output constraint failed: {e}"));
                    return;
                }
            },
            None => false,
        };
        let lp = raw.map(|r| logprobs(&r, token, s.req.logprobs.unwrap_or(0)));
        s.generated += 1;
        let now = Instant::now();
        let (ttft_target, itl_target) = self.pacing.targets(&asks(&s.req));
        let (kind, seconds, target) = match s.last_token {
            None => {
                let t = (now - s.arrival).as_secs_f64();
                self.metrics
                    .time_to_first_token_seconds
                    .get_or_create(&s.labels)
                    .observe(t);
                ("ttft", t, ttft_target)
            }
            Some(prev) => {
                let t = (now - prev).as_secs_f64();
                self.metrics.inter_token_latency_seconds.observe(t);
                ("itl", t, itl_target)
            }
        };
        // Batch has no latency target to miss.
        if target.is_some_and(|t| seconds > t.as_secs_f64()) {
            let labels = vec![
                ("class".to_string(), "interactive".to_string()),
                ("kind".to_string(), kind.to_string()),
            ];
            self.metrics.slo_violations.get_or_create(&labels).inc();
        }
        s.first_token.get_or_insert(now);
        s.last_token = Some(now);
        let tok = &info.tokenizer;
        let eog = !s.req.ignore_eos && tok.eog.contains(&token);
        let mut finish = None;
        let mut text = String::new();
        if eog || s.req.stop_token_ids.contains(&token) {
            finish = Some(FinishReason::Stop);
        } else if !tok.is_special(token) {
            if constrained {
                finish = Some(FinishReason::Stop);
            }
            let piece = s.utf8.push(tok.token_bytes(token));
            let (emit, hit) = s.stop.push(&piece);
            text = emit;
            if hit {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none()
            && (s.generated >= s.req.max_tokens || total_len + 1 >= info.context_length)
        {
            finish = Some(FinishReason::Length);
        }
        if finish == Some(FinishReason::Length) || (finish.is_some() && !s.stop.stopped()) {
            // Nothing can match any more: release what was held back.
            let tail = s.utf8.finish();
            let (emit, _) = s.stop.push(&tail);
            text.push_str(&emit);
            text.push_str(&s.stop.flush());
        }
        let step = TokenStep {
            at: now,
            ..self.this_step.unwrap_or(TokenStep {
                at: now,
                index: 0,
                started: now,
                seqs: 0,
                decode_seqs: 0,
                prefill_tokens: 0,
            })
        };
        send(
            s,
            Event::Token {
                id: token,
                text,
                logprobs: lp,
                step,
            },
        );
        // Counted as generated, not when the request ends: a cancelled request's tokens were
        // computed too (and vLLM's counter counts per step as well).
        self.metrics
            .generation_tokens
            .get_or_create(&s.labels)
            .inc();
        match finish {
            Some(reason) => {
                send(
                    s,
                    Event::Finished {
                        reason,
                        prompt_tokens: s.req.prompt.len(),
                        completion_tokens: s.generated,
                        timing: Timing {
                            arrival: s.arrival,
                            scheduled: s.first_scheduled,
                            first_token: s.first_token,
                            finished: now,
                            prefill_steps: s.prefill_steps,
                        },
                    },
                );
                self.metrics
                    .e2e_request_latency_seconds
                    .get_or_create(&s.labels)
                    .observe((now - s.arrival).as_secs_f64());
                let mut labels = s.labels.clone();
                labels.push(("finished_reason".into(), reason.as_str().into()));
                self.metrics.request_success.get_or_create(&labels).inc();
                // Dropping the entry returns its blocks to the pool.
                self.sched.remove(id);
            }
            None => self.sched.push_token(id, token),
        }
    }
}

/// Most tenants with their own metric label: tenant names come from clients, and every label
/// value is a set of series kept forever.
const MAX_TENANT_LABELS: usize = 64;

fn tenant_label(
    labelled: &mut std::collections::HashSet<String>,
    tenant: &str,
) -> Vec<(String, String)> {
    if labelled.contains(tenant)
        || (labelled.len() < MAX_TENANT_LABELS && labelled.insert(tenant.to_string()))
    {
        metrics::tenant(tenant)
    } else {
        metrics::tenant("other")
    }
}

/// A full or closed channel means the client is gone (its channel has room for every event):
/// the sequence is dropped before the next step.
fn send(s: &mut Payload, e: Event) {
    if s.events.try_send(e).is_err() {
        s.failed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_requests_hold_at_most_their_share_and_give_it_back() {
        let f = Arc::new(InFlight::default());
        let batch: Vec<TenantSlot> = (0..3)
            .map(|_| f.claim("evals", 100, Some(3)).unwrap())
            .collect();
        assert!(matches!(
            f.claim("other-evals", 100, Some(3)),
            Err(SubmitError::BatchBusy(3))
        ));
        // Interactive requests are not counted against it.
        let web = f.claim("web", 100, None).unwrap();
        // A refused claim took nothing: the tenant's count is unchanged.
        assert_eq!(f.0.lock().unwrap().get("other-evals"), None);
        drop(batch);
        drop(web);
        assert!(f.0.lock().unwrap().is_empty());
        assert!(f.claim("other-evals", 100, Some(3)).is_ok());
    }
}
