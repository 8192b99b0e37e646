//! The engine thread: requests arrive over a bounded channel, every step runs one forward pass
//! over all active sequences, and each sequence streams its events back over its own channel.
//!
//! This is iteration-level batching without paging or chunking: a new request is prefilled in
//! the step after it arrives, alongside the decodes of running ones. The serving-core issue adds
//! the paged KV pool, chunked prefill, preemption and fair scheduling behind the same handle.

use std::sync::Arc;
use std::thread;

use tokio::sync::mpsc;

use crate::chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv::{ContiguousKv, KvSeq};
use crate::model::{LogitsWanted, Model, ModelConfig, SeqStep};
use crate::sampling::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use crate::stop::StopMatcher;
use crate::tokenizer::{Tokenizer, Utf8Stream};

/// Most log-probabilities one position may list (OpenAI allows 20).
pub const MAX_LOGPROBS: usize = 20;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests waiting for the engine beyond the running ones; more are refused (backpressure).
    pub max_waiting: usize,
    /// Sequences decoded together in one step.
    pub max_num_seqs: usize,
    /// Context length used, at most the model's own.
    pub max_context: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_waiting: 64,
            max_num_seqs: 8,
            max_context: None,
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
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the engine queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    Invalid(String),
}

/// Facts about the loaded model the front end needs (limits, tokenizer, template).
pub struct ModelInfo {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub context_length: usize,
    pub weight_bytes: usize,
}

impl ModelInfo {
    /// Renders a chat and tokenizes it; special tokens in the rendered text are parsed, and no BOS
    /// is added (templates that want one write it themselves).
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.chat_template.render(messages, add_generation_prompt)?;
        Ok(self.tokenizer.encode(&text, false, true))
    }
}

struct Submission {
    req: GenerateRequest,
    events: mpsc::Sender<Event>,
}

/// Cheap to clone; the engine thread stops when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    info: Arc<ModelInfo>,
    max_waiting: usize,
}

impl EngineHandle {
    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    /// Queues a request; fails at once (never blocks) when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        self.validate(&req)?;
        // Every event of this request fits: one per token, the prompt log-probs, the end.
        let (tx, rx) = mpsc::channel(req.max_tokens + 3);
        self.tx
            .try_send(Submission { req, events: tx })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.max_waiting),
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })?;
        Ok(rx)
    }

    fn validate(&self, req: &GenerateRequest) -> Result<(), SubmitError> {
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
    let info = Arc::new(ModelInfo {
        config: model.config.clone(),
        tokenizer,
        chat_template,
        context_length,
        weight_bytes: model.weight_bytes(),
    });
    let (tx, rx) = mpsc::channel(config.max_waiting.max(1));
    let worker = Worker {
        model,
        info: info.clone(),
        rx,
        max_num_seqs: config.max_num_seqs.max(1),
        active: Vec::new(),
    };
    thread::Builder::new()
        .name("serrano-engine".into())
        .spawn(move || worker.run())
        .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
    Ok(EngineHandle {
        tx,
        info,
        max_waiting: config.max_waiting,
    })
}

struct Sequence {
    req: GenerateRequest,
    events: mpsc::Sender<Event>,
    kv: ContiguousKv,
    sampler: Sampler,
    /// Next token to feed (`None` until the prompt is prefilled).
    next_input: Option<u32>,
    generated: usize,
    utf8: Utf8Stream,
    stop: StopMatcher,
    done: bool,
}

struct Worker {
    model: Model,
    info: Arc<ModelInfo>,
    rx: mpsc::Receiver<Submission>,
    max_num_seqs: usize,
    active: Vec<Sequence>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.active.is_empty() {
                match self.rx.blocking_recv() {
                    Some(s) => self.admit(s),
                    None => return,
                }
            }
            while self.active.len() < self.max_num_seqs {
                match self.rx.try_recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => break,
                }
            }
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
                for s in &mut self.active {
                    let _ = s
                        .events
                        .try_send(Event::Error(format!("internal engine error: {msg}")));
                    s.done = true;
                }
            }
            self.active.retain(|s| !s.done);
        }
    }

    fn admit(&mut self, s: Submission) {
        let c = &self.model.config;
        let kv = ContiguousKv::new(c.n_layers, c.kv_width(), self.info.context_length);
        let sampler = Sampler::new(s.req.sampling.clone(), &s.req.prompt);
        let stop = StopMatcher::new(s.req.stop.clone());
        self.active.push(Sequence {
            req: s.req,
            events: s.events,
            kv,
            sampler,
            next_input: None,
            generated: 0,
            utf8: Utf8Stream::default(),
            stop,
            done: false,
        });
    }

    fn step(&mut self) {
        // Skip sequences whose client has gone away before spending compute on them.
        for s in &mut self.active {
            if s.events.is_closed() {
                s.done = true;
            }
        }
        let inputs: Vec<Vec<u32>> = self
            .active
            .iter()
            .map(|s| {
                if s.done {
                    vec![]
                } else {
                    s.next_input
                        .map_or_else(|| s.req.prompt.clone(), |t| vec![t])
                }
            })
            .collect();
        let mut steps: Vec<SeqStep<'_>> = self
            .active
            .iter_mut()
            .zip(&inputs)
            .map(|(s, toks)| {
                let wanted = match (s.next_input, s.req.prompt_logprobs) {
                    _ if toks.is_empty() => LogitsWanted::None,
                    (None, Some(_)) => LogitsWanted::All,
                    _ => LogitsWanted::Last,
                };
                SeqStep {
                    tokens: toks,
                    kv: &mut s.kv as &mut dyn KvSeq,
                    logits: wanted,
                }
            })
            .collect();
        let result = self.model.forward(&mut steps);
        drop(steps);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for s in &mut self.active {
                    let _ = s.events.try_send(Event::Error(e.to_string()));
                    s.done = true;
                }
                return;
            }
        };
        let vocab = self.model.config.vocab_size;
        for (s, rows) in self.active.iter_mut().zip(logits) {
            if s.done || rows.is_empty() {
                continue;
            }
            if s.next_input.is_none() {
                if let Some(n) = s.req.prompt_logprobs {
                    let p = &s.req.prompt;
                    let mut entries = vec![None];
                    entries.extend(
                        (1..p.len())
                            .map(|i| Some(logprobs(&rows[(i - 1) * vocab..i * vocab], p[i], n))),
                    );
                    send(s, Event::PromptLogprobs(entries));
                }
            }
            let mut last = rows[rows.len() - vocab..].to_vec();
            advance(&self.info, s, &mut last);
        }
    }
}

/// Samples the next token of `s` from its logits and decides whether it is finished.
fn advance(info: &ModelInfo, s: &mut Sequence, logits: &mut [f32]) {
    let raw = s.req.logprobs.map(|_| logits.to_vec());
    let id = s.sampler.sample(logits);
    let lp = raw.map(|r| logprobs(&r, id, s.req.logprobs.unwrap_or(0)));
    s.generated += 1;
    s.next_input = Some(id);
    let tok = &info.tokenizer;
    let eog = !s.req.ignore_eos && tok.eog.contains(&id);
    let mut finish = None;
    let mut text = String::new();
    if eog || s.req.stop_token_ids.contains(&id) {
        finish = Some(FinishReason::Stop);
    } else if !tok.is_special(id) {
        let piece = s.utf8.push(tok.token_bytes(id));
        let (emit, hit) = s.stop.push(&piece);
        text = emit;
        if hit {
            finish = Some(FinishReason::Stop);
        }
    }
    let full = s.req.prompt.len() + s.generated >= info.context_length;
    if finish.is_none() && (s.generated >= s.req.max_tokens || full) {
        finish = Some(FinishReason::Length);
    }
    if finish == Some(FinishReason::Length) || (finish.is_some() && !s.stop.stopped()) {
        // Nothing can match any more: release what was held back.
        let tail = s.utf8.finish();
        let (emit, _) = s.stop.push(&tail);
        text.push_str(&emit);
        text.push_str(&s.stop.flush());
    }
    send(
        s,
        Event::Token {
            id,
            text,
            logprobs: lp,
        },
    );
    if let Some(reason) = finish {
        send(
            s,
            Event::Finished {
                reason,
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: s.generated,
            },
        );
        s.done = true;
    }
}

/// A full or closed channel means the client is gone (its channel has room for every event):
/// the sequence is dropped and its cache freed at the end of this step.
fn send(s: &mut Sequence, e: Event) {
    if s.events.try_send(e).is_err() {
        s.done = true;
    }
}
