//! The one relay from a backend's events to the client, for every backend: a JSON body, or SSE
//! chunks. On the way each piece passes the tenant's output filter and tool allowlist, is
//! tallied on the ticket and timed for the backend's latency estimates; at the end the attempt
//! reports its outcome to the router and the audit record is written, before a stream's
//! `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serrano_api as api;
use serrano_gov::{Reservation, Ticket};
use serrano_router::{Attempt, Outcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{Delta, Event, EventStream, Generation, Logprobs};
use crate::error::ApiError;
use crate::routing::Routing;
use crate::safety::{self, OutputGuard};
use crate::state::unix_now;

/// SSE messages a stream may have waiting for a slow client.
const SSE_BUFFER: usize = 64;

/// Everything the relay needs from the pipeline: the ticket and its reservation, the output
/// filter, and the attempt whose outcome it reports.
pub struct Relay {
    pub ticket: Ticket,
    pub reservation: Reservation,
    pub guard: OutputGuard,
    pub attempt: Attempt,
    pub routing: Arc<Routing>,
    pub backend: String,
    /// When the attempt started (TTFT and gaps are measured from here).
    pub sent: Instant,
    pub deadline: tokio::time::Instant,
    /// `--request-timeout`, for the message when the deadline passes.
    pub limit: Duration,
}

/// Relays a backend's events as the response: SSE when the request streams (the record is
/// written from the stream's task), else a JSON body once every event is in.
pub async fn respond(relay: Relay, gen: &Generation, events: EventStream) -> Response {
    let run = Run::new(relay, gen);
    if gen.stream {
        let (tx, rx) = mpsc::channel(SSE_BUFFER);
        tokio::spawn(run.stream(events, tx));
        return sse_response(rx);
    }
    run.collect(events).await
}

/// Relays a chat generation whole to a caller that reads the answer itself (a step of the
/// server-side tool loop); the record is written as for any response.
pub async fn chat_answer(
    relay: Relay,
    gen: &Generation,
    events: EventStream,
) -> Result<api::ChatCompletion, ApiError> {
    match Run::new(relay, gen).whole(events).await? {
        Whole::Chat(c) => Ok(c),
        Whole::Completion(_) => Err(ApiError::internal("a chat step answered as a completion")),
    }
}

/// A chat answer read whole (a server-side tool loop's), sent as SSE chunks for a client that
/// asked for a stream: per choice its content and tool calls in one delta, then its finish;
/// the usage chunk when asked for; the answer's extra fields on the last chunk; `[DONE]`.
pub fn whole_as_stream(answer: api::ChatCompletion, include_usage: bool) -> Response {
    let chunk = |choices, usage, extra| {
        to_json(&api::ChatCompletionChunk {
            id: answer.id.clone(),
            object: "chat.completion.chunk".into(),
            created: answer.created,
            model: answer.model.clone(),
            choices,
            usage,
            system_fingerprint: answer.system_fingerprint.clone(),
            extra,
        })
    };
    let pending_usage = include_usage.then_some(None);
    let mut out = Vec::new();
    let mut finishes = Vec::new();
    for c in &answer.choices {
        let calls = c.message.tool_calls.as_ref().map(|calls| {
            calls
                .iter()
                .enumerate()
                .map(|(k, t)| api::ToolCallDelta {
                    index: k as u32,
                    id: Some(t.id.clone()),
                    kind: Some(t.kind.clone()),
                    function: Some(api::FunctionCallDelta {
                        name: Some(t.function.name.clone()),
                        arguments: Some(t.function.arguments.clone()),
                    }),
                })
                .collect()
        });
        let delta = api::ChatDelta {
            role: Some("assistant".into()),
            content: c.message.content.clone(),
            tool_calls: calls,
            ..Default::default()
        };
        let piece = api::ChatChunkChoice {
            index: c.index,
            delta,
            ..Default::default()
        };
        out.push(chunk(vec![piece], pending_usage.clone(), api::Extra::new()));
        finishes.push(api::ChatChunkChoice {
            index: c.index,
            finish_reason: c.finish_reason.clone(),
            ..Default::default()
        });
    }
    match include_usage {
        true => {
            out.push(chunk(finishes, pending_usage.clone(), api::Extra::new()));
            out.push(chunk(
                vec![],
                Some(answer.usage.clone()),
                answer.extra.clone(),
            ));
        }
        false => out.push(chunk(finishes, None, answer.extra.clone())),
    }
    out.push("[DONE]".into());
    let stream =
        futures::stream::iter(out).map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(stream).into_response()
}

/// A response read whole.
enum Whole {
    Chat(api::ChatCompletion),
    Completion(api::Completion),
}

/// An SSE response whose events are the strings received (each becomes one `data:` line).
fn sse_response(rx: mpsc::Receiver<String>) -> Response {
    let stream =
        ReceiverStream::new(rx).map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(stream).into_response()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Wire types are plain data; serialization cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn usage(prompt: u64, completion: u64) -> api::Usage {
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    api::Usage::new(clamp(prompt), clamp(completion))
}

/// A fresh response id.
fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

/// The response's fixed fields.
struct Shape {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
    choices: usize,
}

/// One choice of a response being collected whole.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Option<Logprobs>,
    tool_calls: Vec<api::ToolCall>,
    function_call: Option<api::FunctionCall>,
    finish: Option<String>,
    /// Fields of the message (and of the choice) serrano does not model.
    extra: api::Extra,
    choice_extra: api::Extra,
}

impl Choice {
    /// Drops the fields the output filter does not scan: log-probs and fields serrano does not
    /// model.
    fn strip_unfiltered(&mut self) {
        self.logprobs = None;
        self.extra.clear();
        self.choice_extra.clear();
    }
}

/// One relay in progress.
struct Run {
    r: Relay,
    shape: Shape,
    /// Times of the first and last generated piece, and how many there were.
    first: Option<Instant>,
    last: Option<Instant>,
    pieces: u32,
    /// Why the generation did not complete.
    failure: Option<(ApiError, Outcome)>,
    /// A tool call the tenant may not use (streams end there).
    violation: Option<String>,
    meta: api::Extra,
    usage: Option<api::Usage>,
    /// Tool calls as they come, by (choice, call): name and arguments so far.
    calls: std::collections::BTreeMap<(u32, u32), (String, String)>,
}

impl Run {
    fn new(r: Relay, gen: &Generation) -> Run {
        let chat = gen.request.is_chat();
        Run {
            r,
            shape: Shape {
                id: response_id(if chat { "chatcmpl" } else { "cmpl" }),
                created: unix_now(),
                model: gen.model.clone(),
                chat,
                include_usage: gen.include_usage,
                choices: gen.choices,
            },
            first: None,
            last: None,
            pieces: 0,
            failure: None,
            violation: None,
            meta: api::Extra::new(),
            usage: None,
            calls: Default::default(),
        }
    }

    /// The next event, or `None` at the end, on a failure, or past the deadline.
    async fn next(&mut self, events: &mut EventStream) -> Option<Event> {
        match tokio::time::timeout_at(self.r.deadline, events.next()).await {
            Ok(Some(Event::Error(e))) => {
                self.failure = Some((e.error, e.fault.outcome()));
                None
            }
            Ok(e) => e,
            Err(_) => {
                self.failure = Some((ApiError::timeout(self.r.limit), Outcome::Failed));
                None
            }
        }
    }

    /// A piece of text: counted, then what the output filter lets through (`None` once the
    /// choice is blocked, or for a choice the request did not ask for).
    fn shown(&mut self, d: &Delta) -> Option<String> {
        let i = d.index as usize;
        if i >= self.shape.choices {
            return None;
        }
        let shown = self.r.guard.push(i, &d.text);
        if d.generated {
            self.r.ticket.token(i, &shown);
            let now = Instant::now();
            self.first.get_or_insert(now);
            self.last = Some(now);
            self.pieces += 1;
        }
        (!self.r.guard.blocked(i)).then_some(shown)
    }

    /// The end of choice `i`: held-back text, and the finish reason to report.
    fn end_choice(&mut self, i: usize, reason: &str) -> (String, String) {
        let rest = self.r.guard.finish(i);
        self.r.ticket.append_text(i, &rest);
        let reason = self.r.guard.finish_reason(i, reason).to_string();
        self.r.ticket.set_finish_reason(&reason);
        (rest, reason)
    }

    /// Whether the tenant may use the tools a response calls (a refusal's verdict goes on the
    /// record; the calls themselves are recorded whole, see `record_calls`).
    fn tools_allowed(&mut self, names: &[&str]) -> bool {
        names.is_empty() || self.r.guard.tools_allowed(&self.r.ticket, names)
    }

    /// The tool calls of the response on the record: each name and its arguments' sha256.
    fn record_calls(&mut self) {
        for (name, arguments) in std::mem::take(&mut self.calls).into_values() {
            self.r.ticket.add_tool_call(&name, &arguments);
        }
    }

    fn record_usage(&mut self, prompt: u64, completion: u64) {
        self.r.reservation.set_usage(prompt, completion);
        self.usage = Some(usage(prompt, completion));
    }

    /// Fields serrano does not model pass through only while no output filter is on: the
    /// filter does not scan them.
    fn passed(&self, extra: api::Extra) -> api::Extra {
        if self.r.guard.active() {
            api::Extra::new()
        } else {
            extra
        }
    }

    /// Ends the attempt and writes the audit record; `Err` if the record could not be written.
    async fn end(mut self) -> Result<Option<api::Usage>, ApiError> {
        let (status, error, outcome) = match (&self.failure, &self.violation) {
            (_, Some(v)) => (400, Some(v.clone()), Outcome::Refused),
            (Some((e, o)), None) => (e.status.as_u16(), Some(e.message.clone()), *o),
            (None, None) => {
                let ttft = self.first.unwrap_or_else(Instant::now) - self.r.sent;
                let itl = match (self.first, self.last) {
                    (Some(f), Some(l)) if self.pieces > 1 => {
                        Some((l - f).as_secs_f64() * 1e3 / f64::from(self.pieces - 1))
                    }
                    _ => None,
                };
                let ok = Outcome::Ok {
                    ttft_ms: ttft.as_secs_f64() * 1e3,
                    itl_ms: itl,
                };
                (200, None, ok)
            }
        };
        self.record_calls();
        let latency = self.first.map(|f| f - self.r.sent);
        self.r
            .routing
            .metrics
            .finish(self.r.attempt, outcome, latency);
        self.r.guard.record(&self.r.ticket);
        let f = self.r.ticket.finish(status, error).await?;
        self.r.routing.metrics.spent(&self.r.backend, f.cost_nusd);
        Ok(self.usage.take())
    }

    // ------------------------------------------------------------ whole responses

    async fn collect(self, events: EventStream) -> Response {
        match self.whole(events).await {
            Ok(Whole::Chat(c)) => Json(c).into_response(),
            Ok(Whole::Completion(c)) => Json(c).into_response(),
            Err(e) => e.into_response(),
        }
    }

    /// Reads every event, writes the record, and builds the response.
    async fn whole(mut self, mut events: EventStream) -> Result<Whole, ApiError> {
        let mut choices: Vec<Choice> = (0..self.shape.choices).map(|_| Choice::default()).collect();
        while let Some(e) = self.next(&mut events).await {
            self.gather(&mut choices, e);
        }
        if self.failure.is_none() {
            self.check_tools(&mut choices);
        }
        let failure = self.failure.as_ref().map(|(e, _)| e.clone());
        if self.r.guard.active() {
            // What the output filter does not scan does not leave.
            for c in &mut choices {
                c.strip_unfiltered();
            }
        }
        let (head, chat) = (self.head(), self.shape.chat);
        let used = self.end().await?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(if chat {
            Whole::Chat(head.chat(choices, used))
        } else {
            Whole::Completion(head.completion(choices, used))
        })
    }

    fn gather(&mut self, choices: &mut [Choice], e: Event) {
        match e {
            Event::Delta(d) => {
                let Some(shown) = self.shown(&d) else { return };
                let c = &mut choices[d.index as usize];
                c.text.push_str(&shown);
                if let Some(lp) = d.logprobs {
                    append_logprobs(&mut c.logprobs, lp);
                }
                c.extra.extend(d.extra);
            }
            Event::ToolCall {
                index,
                call,
                legacy,
            } => {
                let Some(c) = choices.get_mut(index as usize) else {
                    return;
                };
                let f = call.function.unwrap_or_default();
                if legacy {
                    let fc = c.function_call.get_or_insert_with(Default::default);
                    fc.name.push_str(f.name.as_deref().unwrap_or(""));
                    fc.arguments.push_str(f.arguments.as_deref().unwrap_or(""));
                    return;
                }
                let k = call.index as usize;
                if k >= c.tool_calls.len() {
                    c.tool_calls.resize_with(k + 1, Default::default);
                }
                let t = &mut c.tool_calls[k];
                if let Some(id) = call.id {
                    t.id = id;
                }
                t.kind = call.kind.unwrap_or_else(|| "function".into());
                t.function.name.push_str(f.name.as_deref().unwrap_or(""));
                t.function
                    .arguments
                    .push_str(f.arguments.as_deref().unwrap_or(""));
            }
            Event::Finish {
                index,
                reason,
                extra,
            } => {
                let i = index as usize;
                if i >= choices.len() {
                    return;
                }
                let (rest, reason) = self.end_choice(i, &reason);
                choices[i].text.push_str(&rest);
                choices[i].finish = Some(reason);
                choices[i].choice_extra.extend(extra);
            }
            Event::Usage {
                prompt_tokens,
                completion_tokens,
            } => self.record_usage(prompt_tokens, completion_tokens),
            Event::Meta(m) => self.meta.extend(m),
            Event::Error(_) => {}
        }
    }

    /// Tool calls of a whole response: a call to a tool the tenant may not use removes the
    /// choice's calls (`content_filter`); with output filtering on, arguments are redacted.
    fn check_tools(&mut self, choices: &mut [Choice]) {
        for (i, c) in choices.iter_mut().enumerate() {
            let whole = c
                .tool_calls
                .iter()
                .map(|t| &t.function)
                .chain(c.function_call.iter());
            for (k, f) in whole.enumerate() {
                let key = (i as u32, k as u32);
                self.calls
                    .insert(key, (f.name.clone(), f.arguments.clone()));
            }
            let names: Vec<String> = c
                .tool_calls
                .iter()
                .map(|t| t.function.name.clone())
                .chain(c.function_call.iter().map(|f| f.name.clone()))
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if !self.tools_allowed(&refs) {
                c.tool_calls.clear();
                c.function_call = None;
                c.finish = Some(safety::CONTENT_FILTER.into());
            }
            for t in &mut c.tool_calls {
                t.function.arguments = self.r.guard.redact_once(&t.function.arguments);
            }
            if let Some(f) = &mut c.function_call {
                f.arguments = self.r.guard.redact_once(&f.arguments);
            }
        }
    }

    // ------------------------------------------------------------ streams

    /// Sends one message; `false` if the client is gone or stopped reading past the deadline
    /// (the caller returns, and dropping the events and the ticket cancels the generation and
    /// audits a 499).
    async fn send(&self, tx: &mpsc::Sender<String>, data: String) -> bool {
        matches!(
            tokio::time::timeout_at(self.r.deadline, tx.send(data)).await,
            Ok(Ok(()))
        )
    }

    async fn stream(mut self, mut events: EventStream, tx: mpsc::Sender<String>) {
        if self.shape.chat {
            for i in 0..self.shape.choices {
                let first = api::ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    ..Default::default()
                };
                let msg = self.chat_chunk(i as u32, first, None, None, api::Extra::new());
                if !self.send(&tx, msg).await {
                    return;
                }
            }
        }
        while let Some(e) = self.next(&mut events).await {
            let Some(msg) = self.chunk(e) else { continue };
            if !self.send(&tx, msg).await {
                self.count_unsent(&mut events);
                return;
            }
            if self.violation.is_some() {
                break;
            }
        }
        if let Some(v) = &self.violation {
            let e = ApiError {
                code: Some("content_policy_violation".into()),
                ..ApiError::invalid(v.clone())
            };
            let _ = self.send(&tx, to_json(&e.body())).await;
        } else if let Some((e, _)) = &self.failure {
            tracing::warn!(backend = %self.r.backend, "stream failed: {}", e.message);
            let _ = self.send(&tx, to_json(&e.body())).await;
        }
        let complete = self.failure.is_none() && self.violation.is_none();
        let (include_usage, head) = (self.shape.include_usage, self.head());
        let chat = self.shape.chat;
        // The record is written before the last chunk, so a client that saw [DONE] is audited.
        let used = match self.end().await {
            Ok(u) => u,
            Err(e) => {
                let _ = tx.send(to_json(&e.body())).await;
                return;
            }
        };
        if let (true, true, Some(u)) = (complete, include_usage, used) {
            let msg = match chat {
                true => head.chat_chunk(vec![], Some(Some(u))),
                false => to_json(&api::Completion {
                    usage: Some(u),
                    ..head.completion_base()
                }),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = tx.send("[DONE]".into()).await;
    }

    /// The client is gone or stopped reading: what the backend already produced is still
    /// tallied (and its usage, if it got that far), so that a client that stops reading is
    /// charged for what was generated for it, not only for what it read. Then dropping the
    /// events cancels the rest.
    fn count_unsent(&mut self, events: &mut EventStream) {
        use futures::FutureExt;
        // Unconstrained: tokio's cooperative budget would report the channels empty after
        // 128 receives in this task.
        while let Some(Some(e)) = tokio::task::unconstrained(events.next()).now_or_never() {
            match e {
                Event::Delta(d) => {
                    self.shown(&d);
                }
                Event::Usage {
                    prompt_tokens,
                    completion_tokens,
                } => self.record_usage(prompt_tokens, completion_tokens),
                _ => {}
            }
        }
    }

    fn head(&self) -> Head {
        Head {
            id: self.shape.id.clone(),
            created: self.shape.created,
            model: self.shape.model.clone(),
            meta: self.meta.clone(),
        }
    }

    /// The SSE message for one event, if it shows anything.
    fn chunk(&mut self, e: Event) -> Option<String> {
        match e {
            Event::Delta(d) => {
                let shown = self.shown(&d)?;
                let logprobs = d.logprobs.filter(|_| !self.r.guard.active());
                let extra = self.passed(d.extra);
                if shown.is_empty() && logprobs.is_none() && extra.is_empty() {
                    return None;
                }
                Some(match (self.shape.chat, logprobs) {
                    (true, lp) => {
                        let delta = api::ChatDelta {
                            content: Some(shown),
                            extra,
                            ..Default::default()
                        };
                        let lp = lp.and_then(chat_logprobs);
                        self.chat_chunk(d.index, delta, lp, None, api::Extra::new())
                    }
                    (false, lp) => {
                        let lp = lp.and_then(completion_logprobs);
                        self.completion_chunk(d.index, shown, lp, None, api::Extra::new())
                    }
                })
            }
            Event::ToolCall {
                index,
                call,
                legacy,
            } => {
                let f = call.function.clone().unwrap_or_default();
                let so_far = self.calls.entry((index, call.index)).or_default();
                so_far.0.push_str(f.name.as_deref().unwrap_or(""));
                so_far.1.push_str(f.arguments.as_deref().unwrap_or(""));
                let name = f.name;
                if let Some(name) = name.filter(|n| !n.is_empty()) {
                    if !self.tools_allowed(&[name.as_str()]) {
                        self.violation = Some(format!(
                            "the model called a tool this key may not use ({name})"
                        ));
                        return None;
                    }
                }
                let delta = match legacy {
                    true => api::ChatDelta {
                        function_call: call.function,
                        ..Default::default()
                    },
                    false => api::ChatDelta {
                        tool_calls: Some(vec![call]),
                        ..Default::default()
                    },
                };
                Some(self.chat_chunk(index, delta, None, None, api::Extra::new()))
            }
            Event::Finish {
                index,
                reason,
                extra,
            } => {
                let i = index as usize;
                if i >= self.shape.choices {
                    return None;
                }
                let (rest, reason) = self.end_choice(i, &reason);
                let extra = self.passed(extra);
                Some(match self.shape.chat {
                    true => {
                        let delta = api::ChatDelta {
                            content: (!rest.is_empty()).then_some(rest),
                            ..Default::default()
                        };
                        self.chat_chunk(index, delta, None, Some(reason), extra)
                    }
                    false => self.completion_chunk(index, rest, None, Some(reason), extra),
                })
            }
            Event::Usage {
                prompt_tokens,
                completion_tokens,
            } => {
                self.record_usage(prompt_tokens, completion_tokens);
                None
            }
            Event::Meta(m) => {
                self.meta.extend(m);
                None
            }
            Event::Error(_) => None,
        }
    }

    fn chat_chunk(
        &self,
        index: u32,
        delta: api::ChatDelta,
        logprobs: Option<api::ChatLogprobs>,
        finish: Option<String>,
        extra: api::Extra,
    ) -> String {
        let choice = api::ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason: finish,
            extra,
        };
        let usage = self.shape.include_usage.then_some(None);
        self.head().chat_chunk(vec![choice], usage)
    }

    fn completion_chunk(
        &self,
        index: u32,
        text: String,
        logprobs: Option<api::CompletionLogprobs>,
        finish: Option<String>,
        extra: api::Extra,
    ) -> String {
        to_json(&api::Completion {
            choices: vec![api::CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: finish,
                extra,
            }],
            ..self.head().completion_base()
        })
    }
}

fn chat_logprobs(lp: Logprobs) -> Option<api::ChatLogprobs> {
    match lp {
        Logprobs::Chat(content) => Some(api::ChatLogprobs {
            content,
            ..Default::default()
        }),
        Logprobs::Completion(_) => None,
    }
}

fn completion_logprobs(lp: Logprobs) -> Option<api::CompletionLogprobs> {
    match lp {
        Logprobs::Completion(c) => Some(c),
        Logprobs::Chat(_) => None,
    }
}

/// Adds a later piece's log-probs to a choice's.
fn append_logprobs(acc: &mut Option<Logprobs>, more: Logprobs) {
    match (acc, more) {
        (Some(Logprobs::Chat(a)), Logprobs::Chat(b)) => a.extend(b),
        (Some(Logprobs::Completion(a)), Logprobs::Completion(b)) => a.extend(b),
        (slot, more) => *slot = Some(more),
    }
}

/// The fields every response and chunk of one request share.
struct Head {
    id: String,
    created: u64,
    model: String,
    /// An upstream's response-level fields (`system_fingerprint` among them).
    meta: api::Extra,
}

impl Head {
    fn split_meta(&self) -> (Option<String>, api::Extra) {
        let mut extra = self.meta.clone();
        let fingerprint = extra
            .remove("system_fingerprint")
            .and_then(|v| v.as_str().map(String::from));
        // Fields serrano sets itself are never taken from an upstream.
        for k in ["id", "object", "created", "model", "choices", "usage"] {
            extra.remove(k);
        }
        (fingerprint, extra)
    }

    fn chat_chunk(
        &self,
        choices: Vec<api::ChatChunkChoice>,
        usage: Option<Option<api::Usage>>,
    ) -> String {
        let (system_fingerprint, extra) = self.split_meta();
        to_json(&api::ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint,
            extra,
        })
    }

    fn completion_base(&self) -> api::Completion {
        let (system_fingerprint, extra) = self.split_meta();
        api::Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![],
            usage: None,
            system_fingerprint,
            extra,
        }
    }

    fn chat(self, choices: Vec<Choice>, usage: Option<api::Usage>) -> api::ChatCompletion {
        let (system_fingerprint, extra) = self.split_meta();
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let tool_calls = (!c.tool_calls.is_empty()).then_some(c.tool_calls);
                let content = match (c.text.is_empty(), &tool_calls, &c.function_call) {
                    (true, Some(_), _) | (true, _, Some(_)) => None,
                    _ => Some(c.text),
                };
                api::ChatChoice {
                    index: i as u32,
                    message: api::AssistantMessage {
                        role: "assistant".into(),
                        content,
                        tool_calls,
                        function_call: c.function_call,
                        extra: c.extra,
                    },
                    logprobs: c.logprobs.and_then(chat_logprobs),
                    finish_reason: c.finish,
                    extra: c.choice_extra,
                }
            })
            .collect();
        api::ChatCompletion {
            id: self.id,
            object: "chat.completion".into(),
            created: self.created,
            model: self.model,
            choices,
            usage,
            system_fingerprint,
            extra,
        }
    }

    fn completion(self, choices: Vec<Choice>, usage: Option<api::Usage>) -> api::Completion {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| api::CompletionChoice {
                index: i as u32,
                text: c.text,
                logprobs: c.logprobs.and_then(completion_logprobs),
                finish_reason: c.finish,
                extra: c.choice_extra,
            })
            .collect();
        api::Completion {
            choices,
            usage,
            ..self.completion_base()
        }
    }
}
