//! The in-process engine as a backend: chat templates and tokenizing off the async workers,
//! the engine's admission checks before any reservation, and its events in the backend shape
//! (log-probs named with its tokenizer, an echoed prompt, usage once every choice is done).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use serrano_api as api;
use serrano_engine::{
    ChatMessage, Constraint, EngineHandle, Event as EngineEvent, GenerateRequest, ModelInfo,
    TokenLogprobs,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{
    AttemptCtx, Backend, BackendError, Delta, Event, EventStream, Generation, Logprobs, Prepared,
    Request,
};
use crate::error::ApiError;
use crate::grammar::Grammars;
use crate::params;
use crate::tools::{self, Tools};

/// Default `max_tokens` for legacy completions, as OpenAI's.
const DEFAULT_COMPLETION_MAX_TOKENS: u64 = 16;

/// Request fields OpenAI defines that this backend does not model, with the values it can
/// honour anyway (`None`: only `null`). Anything else in one of them is a 400 naming it; fields
/// OpenAI does not define are ignored, as OpenAI-compatible servers do.
const UNSUPPORTED_FIELDS: &[(&str, Option<&[&str]>)] = &[
    ("parallel_tool_calls", Some(&["true", "false"])),
    ("functions", Some(&["[]"])),
    ("function_call", Some(&["\"none\""])),
    ("modalities", Some(&[r#"["text"]"#])),
    ("service_tier", Some(&["\"auto\"", "\"default\""])),
    ("store", Some(&["false"])),
    ("audio", None),
    ("prediction", None),
    ("reasoning_effort", None),
    ("verbosity", None),
    ("web_search_options", None),
    ("metadata", None),
    ("best_of", Some(&["1"])),
];

/// Message fields OpenAI defines that this backend cannot render yet.
const UNSUPPORTED_MESSAGE_FIELDS: &[&str] = &["function_call", "audio"];

/// One model on the in-process engine.
pub struct LocalBackend {
    name: String,
    engine: EngineHandle,
    /// The vocabulary indexed for structured outputs, built on first use (it takes a moment).
    grammars: std::sync::OnceLock<Result<Grammars, String>>,
}

impl LocalBackend {
    pub fn new(name: &str, engine: EngineHandle) -> LocalBackend {
        LocalBackend {
            name: name.to_string(),
            engine,
            grammars: std::sync::OnceLock::new(),
        }
    }

    /// The constraint the output must follow: the tools' grammar when the model may call one,
    /// else `response_format`'s schema, else none.
    async fn output_constraint(
        &self,
        gen: &Generation,
        tools: Option<&Tools>,
    ) -> Result<Option<Constraint>, ApiError> {
        let schema = response_schema(gen.request.extra())?;
        let spec = match (tools.and_then(Tools::grammar), schema) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_param(
                    "response_format",
                    "response_format together with tools the model may call is not supported by the local engine",
                ))
            }
            (Some(lark), None) => Spec::Lark(lark),
            (None, Some(schema)) => Spec::Schema(schema),
            (None, None) => return Ok(None),
        };
        let info = self.info().clone();
        let cell = &self.grammars;
        if cell.get().is_none() {
            // Indexing the vocabulary is CPU work: off the async workers, once.
            let built = tokio::task::spawn_blocking(move || Grammars::new(&info))
                .await
                .map_err(ApiError::internal)?;
            let _ = cell.set(built);
        }
        let grammars = match cell.get() {
            Some(Ok(g)) => g,
            Some(Err(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the grammar index was not built")),
        };
        match spec {
            Spec::Schema(schema) => grammars.json_schema(&schema).map_err(|e| {
                ApiError::invalid_param(
                    "response_format",
                    format!("the JSON schema cannot be used: {e}"),
                )
            }),
            Spec::Lark(lark) => grammars.lark(&lark).map_err(|e| {
                ApiError::invalid_param(
                    "tools",
                    format!("a tool's parameters schema cannot be used: {e}"),
                )
            }),
        }
        .map(Some)
    }

    /// The prompt's token ids of a generation this backend rendered.
    pub(crate) fn prompt_of(p: &Prepared) -> Option<&[u32]> {
        p.work::<Work>().map(|w| w.req.prompt.as_slice())
    }

    /// Renders and checks a generation as `prepare` does (context, vocabulary, fields), but
    /// asks the engine for no queue room: for a backend that uses only the rendering.
    pub(crate) async fn render_only(&self, gen: &Generation) -> Result<Prepared, BackendError> {
        let work = self.render(gen).await.map_err(BackendError::refused)?;
        self.engine.validate(&work.req).map_err(engine_error)?;
        let (prompt, max) = (work.req.prompt.len() as u64, work.req.max_tokens as u64);
        Ok(Prepared::new(prompt, max, work))
    }

    fn info(&self) -> &Arc<ModelInfo> {
        self.engine.info()
    }
}

/// What `prepare` hands to `generate`.
struct Work {
    req: GenerateRequest,
    echo: bool,
    as_ids: bool,
    /// The model may answer with a tool call (an envelope the relay reports as `tool_calls`).
    calls_tools: bool,
    /// Each token's step goes into the trace.
    token_events: bool,
}

/// What a constraint is built from.
enum Spec {
    Schema(Value),
    Lark(String),
}

/// The JSON schema `response_format` asks for: `text` none, `json_object` any object,
/// `json_schema` its `schema` (llguidance honours `strict`'s rules: no properties beyond those
/// listed when `additionalProperties` is false).
fn response_schema(extra: &serrano_api::Extra) -> Result<Option<Value>, ApiError> {
    let Some(rf) = extra.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::invalid_param("response_format", m.to_string());
    match rf["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(serde_json::json!({"type": "object"}))),
        Some("json_schema") => {
            let schema = &rf["json_schema"]["schema"];
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("json_schema.schema must be a JSON schema object"));
            }
            Ok(Some(schema.clone()))
        }
        _ => Err(bad(
            "response_format.type must be 'text', 'json_object' or 'json_schema'",
        )),
    }
}

/// The first field the local engine cannot honour, with why.
fn unsupported(gen: &Generation) -> Option<ApiError> {
    let extra = gen.request.extra();
    for (field, ok) in UNSUPPORTED_FIELDS {
        let Some(v) = extra.get(*field).filter(|v| !v.is_null()) else {
            continue;
        };
        let accepted = ok.is_some_and(|ok| {
            ok.iter()
                .any(|o| serde_json::from_str::<Value>(o).is_ok_and(|o| &o == v))
        });
        if !accepted {
            return Some(ApiError::invalid_param(
                field,
                format!("'{field}' is not supported by the local engine (backend has no such feature yet)"),
            ));
        }
    }
    if let Request::Chat(r) = &gen.request {
        for (i, m) in r.messages.iter().enumerate() {
            if let Some(f) = UNSUPPORTED_MESSAGE_FIELDS
                .iter()
                .find(|f| m.extra.get(**f).is_some_and(|v| !v.is_null()))
            {
                return Some(ApiError::invalid_param(
                    &format!("messages[{i}].{f}"),
                    format!("'{f}' in messages is not supported by the local engine"),
                ));
            }
        }
    }
    if let Request::Completion(r) = &gen.request {
        if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Some(ApiError::invalid_param("suffix", "suffix is not supported"));
        }
    }
    None
}

/// The messages as the template renders them. With tools, their description goes into the
/// system message (added first when there is none), and an assistant turn's earlier tool calls
/// read as the envelopes it wrote.
fn engine_messages(
    messages: &[api::ChatMessage],
    tools: Option<&Tools>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = messages
        .iter()
        .map(|m| {
            let mut content = match &m.content {
                None => String::new(),
                Some(c) => c
                    .text()
                    .map_err(|e| ApiError::invalid_param("messages", e))?,
            };
            if let Some(calls) = m.extra.get("tool_calls").filter(|c| !c.is_null()) {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&tools::render_calls(calls));
            }
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    if let Some(t) = tools.filter(|t| t.active()) {
        match out.first_mut().filter(|m| m.role == "system") {
            Some(system) => {
                system.content.push_str("\n\n");
                system.content.push_str(&t.prompt());
            }
            None => out.insert(0, ChatMessage::new("system", &t.prompt())),
        }
    }
    Ok(out)
}

/// Text longer than the context could ever hold is refused before any tokenizing.
fn check_text_len(info: &ModelInfo, param: &str, len: usize) -> Result<(), ApiError> {
    if len > info.max_prompt_bytes() {
        return Err(ApiError::invalid_param(param, format!("the prompt ({len} bytes) is longer than this model's context of {} tokens could hold", info.context_length)));
    }
    Ok(())
}

/// Tokenizes off the async workers: a long prompt must not stall other connections.
pub async fn encode(
    info: &Arc<ModelInfo>,
    param: &str,
    text: String,
    add_special: bool,
) -> Result<Vec<u32>, ApiError> {
    check_text_len(info, param, text.len())?;
    let info = info.clone();
    tokio::task::spawn_blocking(move || info.tokenizer.encode(&text, add_special, true))
        .await
        .map_err(ApiError::internal)
}

/// Renders the chat template and tokenizes, off the async workers.
pub async fn chat_prompt(
    info: &Arc<ModelInfo>,
    messages: &[api::ChatMessage],
    tools: Option<&Tools>,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = engine_messages(messages, tools)?;
    check_text_len(info, "messages", msgs.iter().map(|m| m.content.len()).sum())?;
    let info = info.clone();
    tokio::task::spawn_blocking(move || info.chat_prompt(&msgs, add_generation_prompt))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

/// The prompt's token ids: the rendered chat, or the one legacy prompt.
async fn prompt_ids(
    info: &Arc<ModelInfo>,
    request: &Request,
    tools: Option<&Tools>,
) -> Result<Vec<u32>, ApiError> {
    let prompt = match request {
        Request::Chat(r) => chat_prompt(info, &r.messages, tools, true).await?,
        Request::Completion(r) => match &r.prompt {
            api::PromptSpec::Text(s) => encode(info, "prompt", s.clone(), true).await?,
            api::PromptSpec::Texts(v) if v.len() == 1 => {
                encode(info, "prompt", v[0].clone(), true).await?
            }
            api::PromptSpec::Tokens(t) => t.clone(),
            api::PromptSpec::TokenLists(v) if v.len() == 1 => v[0].clone(),
            _ => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "batched prompts are not supported by the local engine; send one prompt per request",
                ))
            }
        },
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    Ok(prompt)
}

impl LocalBackend {
    async fn render(&self, gen: &Generation) -> Result<Work, ApiError> {
        if let Some(e) = unsupported(gen) {
            return Err(e);
        }
        let info = self.info();
        let vocab = info.config.vocab_size;
        let tools = match &gen.request {
            Request::Chat(r) => tools::parse(&r.extra)?,
            Request::Completion(_) => None,
        };
        let prompt = prompt_ids(info, &gen.request, tools.as_ref()).await?;
        let (sampling, echo, as_ids) = match &gen.request {
            Request::Chat(r) => (&r.sampling, false, false),
            Request::Completion(r) => (&r.sampling, r.echo, r.return_tokens_as_token_ids),
        };
        params::check_token_ids(&gen.sampling, sampling, vocab)?;
        let max_tokens = match (gen.max_tokens, gen.request.is_chat()) {
            (Some(m), _) => m,
            // Without a limit, a chat may use the rest of the context, as OpenAI's does.
            (None, true) => (info.context_length.saturating_sub(prompt.len()) as u64).max(1),
            (None, false) => DEFAULT_COMPLETION_MAX_TOKENS,
        };
        let constraint = self.output_constraint(gen, tools.as_ref()).await?;
        let req = GenerateRequest {
            constraint,
            sampling: gen.sampling.clone(),
            max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
            stop: gen.stop.clone(),
            stop_token_ids: sampling.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: sampling.ignore_eos,
            logprobs: gen.logprobs,
            prompt_logprobs: if echo { gen.logprobs } else { None },
            prompt,
            tenant: gen.tenant.clone(),
            priority: gen.priority,
            class: gen.class,
            ttft_target: gen.ttft_target,
            itl_target: gen.itl_target,
        };
        let calls_tools = tools.as_ref().is_some_and(Tools::active);
        Ok(Work {
            req,
            echo,
            as_ids,
            calls_tools,
            token_events: gen.token_events,
        })
    }
}

fn engine_error(e: serrano_engine::SubmitError) -> BackendError {
    use serrano_engine::SubmitError as S;
    match e {
        S::QueueFull(_) | S::TenantBusy { .. } | S::BatchBusy(_) => BackendError::busy(e.into()),
        S::Stopped => BackendError::failed(e.into()),
        S::Invalid(_) => BackendError::refused(e.into()),
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn context_length(&self, _model: &str) -> Option<u64> {
        Some(self.info().context_length as u64)
    }

    fn exact_tally(&self) -> bool {
        true
    }

    async fn prepare(&self, gen: &Generation, _model: &str) -> Result<Prepared, BackendError> {
        let work = self.render(gen).await.map_err(BackendError::refused)?;
        self.engine.check(&work.req, gen.n).map_err(engine_error)?;
        let (prompt, max) = (work.req.prompt.len() as u64, work.req.max_tokens as u64);
        Ok(Prepared::new(prompt, max, work))
    }

    async fn generate(
        &self,
        gen: &Generation,
        work: Prepared,
        _ctx: &AttemptCtx,
    ) -> Result<EventStream, BackendError> {
        let work: Work = work.into_work()?;
        // Choice `i` samples with `seed + i`, so choices differ yet repeat.
        let choices = (0..gen.n)
            .map(|i| {
                let mut g = work.req.clone();
                g.sampling.seed = work.req.sampling.seed.map(|s| s.wrapping_add(i as u64));
                g
            })
            .collect();
        let rxs = self.engine.submit_n(choices).map_err(engine_error)?;
        Ok(events(
            self.info().clone(),
            &work,
            gen.request.is_chat(),
            rxs,
        ))
    }

    fn engine(&self) -> Option<&EngineHandle> {
        Some(&self.engine)
    }
}

/// How tokens are named in log-prob listings.
struct TokenNamer {
    info: Arc<ModelInfo>,
    as_ids: bool,
}

impl TokenNamer {
    fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.info.tokenizer.token_text(id)
        }
    }

    fn top_map(&self, lp: &TokenLogprobs) -> BTreeMap<String, f32> {
        lp.top.iter().map(|&(t, l)| (self.name(t), l)).collect()
    }

    /// Appends one token to a legacy `logprobs` object; `offset` counts characters so far.
    fn push_completion(
        &self,
        out: &mut api::CompletionLogprobs,
        id: u32,
        lp: Option<&TokenLogprobs>,
        offset: &mut u32,
    ) {
        out.tokens.push(self.name(id));
        out.token_logprobs.push(lp.map(|l| l.logprob));
        out.top_logprobs.push(lp.map(|l| self.top_map(l)));
        out.text_offset.push(*offset);
        *offset += self.info.tokenizer.token_text(id).chars().count() as u32;
    }

    fn chat(&self, lp: &TokenLogprobs) -> api::ChatTokenLogprob {
        let tok = &self.info.tokenizer;
        api::ChatTokenLogprob {
            token: self.name(lp.token),
            logprob: lp.logprob,
            bytes: Some(tok.token_bytes(lp.token).to_vec()),
            top_logprobs: lp
                .top
                .iter()
                .map(|&(t, l)| api::ChatTopLogprob {
                    token: self.name(t),
                    logprob: l,
                    bytes: Some(tok.token_bytes(t).to_vec()),
                })
                .collect(),
        }
    }
}

/// Turns the engine's per-choice events into one backend stream.
struct Translator {
    namer: TokenNamer,
    chat: bool,
    logprobs: bool,
    echo: bool,
    prompt: Vec<u32>,
    /// Per choice: characters before the next token (legacy `text_offset`), prompt echoed,
    /// finished.
    offset: Vec<u32>,
    echoed: Vec<bool>,
    finished: Vec<bool>,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Per choice, when the model may call a tool: what its answer has turned out to be.
    answers: Option<Vec<Answer>>,
    /// The attempt's trace span: each choice's queue, prefill and decode become its children.
    span: tracing::Span,
    /// Per choice, the steps of its tokens, kept for the trace when the request asked for token
    /// events and is traced (at most [`crate::trace::MAX_TOKEN_EVENTS`]; the rest are counted).
    token_steps: Option<Vec<crate::trace::TokenSteps>>,
}

/// What a choice's answer is, when it may be a tool call: the grammar makes a call start with
/// `{` and text start with anything else, so the first visible character decides.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Undecided,
    Text,
    /// An envelope being written, streamed as a tool call (its name, then its arguments).
    Call(tools::Envelope),
}

impl Translator {
    /// The text of a token as the client sees it now (none of a tool call's envelope), and the
    /// pieces of a tool call it completes.
    fn answer(&mut self, i: usize, text: String) -> (String, Vec<Event>) {
        let Some(answer) = self.answers.as_mut().and_then(|a| a.get_mut(i)) else {
            return (text, vec![]);
        };
        let envelope = match answer {
            Answer::Text => return (text, vec![]),
            Answer::Undecided if text.is_empty() => return (text, vec![]),
            Answer::Undecided if !text.trim_start().starts_with('{') => {
                *answer = Answer::Text;
                return (text, vec![]);
            }
            Answer::Undecided => {
                *answer = Answer::Call(tools::Envelope::default());
                let Answer::Call(e) = answer else {
                    return (text, vec![]);
                };
                e
            }
            Answer::Call(e) => e,
        };
        let pieces = envelope.push(&text);
        let events = pieces.into_iter().map(|p| call_event(i, p)).collect();
        (String::new(), events)
    }

    /// The end of choice `i`: the rest of a tool call when its answer was an envelope (whole:
    /// `tool_calls`), then its finish.
    fn end_answer(&mut self, i: usize, reason: &str) -> Vec<Event> {
        let finish = |reason: &str| Event::Finish {
            index: i as u32,
            reason: reason.to_string(),
            extra: Default::default(),
        };
        let envelope = match self.answers.as_mut().and_then(|a| a.get_mut(i)) {
            Some(Answer::Call(e)) => std::mem::take(e),
            _ => return vec![finish(reason)],
        };
        let text = |text: String| {
            Event::Delta(Delta {
                index: i as u32,
                text,
                ..Default::default()
            })
        };
        let rest =
            |rest: String| (!rest.is_empty()).then(|| call_event(i, tools::Piece::Arguments(rest)));
        match envelope.finish() {
            tools::Ending::Call(r) => rest(r).into_iter().chain([finish("tool_calls")]).collect(),
            // Cut off (max_tokens) after its name: the arguments as far as they got, as
            // OpenAI reports a call cut off.
            tools::Ending::Cut(r) => rest(r).into_iter().chain([finish(reason)]).collect(),
            // Cut off before it named a tool: the text as it is.
            tools::Ending::Text(held) => vec![text(held), finish(reason)],
        }
    }

    fn prompt_text(&self) -> String {
        self.namer.info.tokenizer.decode(&self.prompt, false)
    }

    /// The echoed prompt of choice `i`, with its log-probs when they were asked for.
    fn echo(&mut self, i: usize, entries: Option<&[Option<TokenLogprobs>]>) -> Event {
        self.echoed[i] = true;
        let logprobs = entries.map(|entries| {
            let mut lp = api::CompletionLogprobs::default();
            for (k, &id) in self.prompt.iter().enumerate() {
                let l = entries.get(k).and_then(|e| e.as_ref());
                self.namer
                    .push_completion(&mut lp, id, l, &mut self.offset[i]);
            }
            Logprobs::Completion(lp)
        });
        Event::Delta(Delta {
            index: i as u32,
            text: self.prompt_text(),
            generated: false,
            logprobs,
            extra: Default::default(),
        })
    }

    fn token(&mut self, i: usize, id: u32, text: String, lp: Option<TokenLogprobs>) -> Event {
        let logprobs = match (self.logprobs, self.chat) {
            (false, _) => None,
            (true, true) => Some(Logprobs::Chat(
                lp.iter().map(|l| self.namer.chat(l)).collect(),
            )),
            (true, false) => {
                let mut out = api::CompletionLogprobs::default();
                self.namer
                    .push_completion(&mut out, id, lp.as_ref(), &mut self.offset[i]);
                Some(Logprobs::Completion(out))
            }
        };
        Event::Delta(Delta {
            index: i as u32,
            text,
            generated: true,
            logprobs,
            extra: Default::default(),
        })
    }

    /// The backend events for one engine event of choice `i` (`None`: its channel closed).
    fn translate(&mut self, i: usize, e: Option<EngineEvent>) -> Vec<Event> {
        match e {
            Some(EngineEvent::PromptLogprobs(p)) if self.echo && !self.echoed[i] => {
                vec![self.echo(i, Some(&p))]
            }
            Some(EngineEvent::PromptLogprobs(_)) => vec![],
            Some(EngineEvent::Token {
                id,
                text,
                logprobs,
                step,
            }) => {
                if let Some(steps) = &mut self.token_steps {
                    steps[i].push(step);
                }
                let (shown, call) = self.answer(i, text);
                let mut out = vec![self.token(i, id, shown, logprobs)];
                out.extend(call);
                out
            }
            Some(EngineEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                timing,
            }) => {
                let steps = self.token_steps.as_mut().map(|s| std::mem::take(&mut s[i]));
                crate::trace::engine_phases(&self.span, i, &timing, completion_tokens, steps);
                self.finished[i] = true;
                self.prompt_tokens = prompt_tokens as u64;
                self.completion_tokens += completion_tokens as u64;
                let mut out = self.end_answer(i, reason.as_str());
                if self.finished.iter().all(|f| *f) {
                    out.push(Event::Usage {
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: self.completion_tokens,
                    });
                }
                out
            }
            Some(EngineEvent::Error(e)) => {
                vec![Event::Error(BackendError::failed(ApiError::internal(e)))]
            }
            None if self.finished[i] => vec![],
            None => vec![Event::Error(BackendError::failed(ApiError::internal(
                "the engine dropped the request",
            )))],
        }
    }
}

/// One piece of choice `i`'s tool call (its only one: index 0) as an event: the name comes
/// with the call's id.
fn call_event(i: usize, piece: tools::Piece) -> Event {
    let (id, name, arguments) = match piece {
        tools::Piece::Name(name) => (Some(tools::call_id()), Some(name), String::new()),
        tools::Piece::Arguments(a) => (None, None, a),
    };
    Event::ToolCall {
        index: i as u32,
        call: api::ToolCallDelta {
            index: 0,
            kind: id.as_ref().map(|_| "function".to_string()),
            id,
            function: Some(api::FunctionCallDelta {
                name,
                arguments: Some(arguments),
            }),
        },
        legacy: false,
    }
}

fn events(
    info: Arc<ModelInfo>,
    work: &Work,
    chat: bool,
    rxs: Vec<mpsc::Receiver<EngineEvent>>,
) -> EventStream {
    let n = rxs.len();
    let mut t = Translator {
        namer: TokenNamer {
            info,
            as_ids: work.as_ids,
        },
        chat,
        logprobs: work.req.logprobs.is_some(),
        echo: work.echo,
        prompt: work.req.prompt.clone(),
        offset: vec![0; n],
        echoed: vec![false; n],
        finished: vec![false; n],
        prompt_tokens: 0,
        completion_tokens: 0,
        answers: work.calls_tools.then(|| vec![Answer::Undecided; n]),
        span: tracing::Span::current(),
        token_steps: None,
    };
    if work.token_events && !t.span.is_disabled() {
        t.token_steps = Some(vec![crate::trace::TokenSteps::default(); n]);
    }
    // Without prompt log-probs the echo goes out at once; with them, when they arrive.
    let first: Vec<Event> = if work.echo && work.req.prompt_logprobs.is_none() {
        (0..n).map(|i| t.echo(i, None)).collect()
    } else {
        vec![]
    };
    let merged = futures::stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        ReceiverStream::new(rx)
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .map(move |e| (i, e))
            .boxed()
    }));
    let rest = merged.flat_map(move |(i, e)| futures::stream::iter(t.translate(i, e)));
    futures::stream::iter(first).chain(rest).boxed()
}
