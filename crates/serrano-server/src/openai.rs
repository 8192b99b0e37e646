//! The OpenAI-compatible routes: completions, chat completions (both streamed over SSE or not),
//! models, and vLLM's tokenize/detokenize.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serrano_api as api;
use serrano_engine::{ChatMessage, Event, FinishReason, GenerateRequest, ModelInfo, TokenLogprobs};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::gov::principal;
use crate::params;
use crate::routing::Handle;
use crate::safety::{self, OutputGuard};
use crate::upstream;
use crate::{unix_now, AppState};
use serrano_gov::{GovError, Principal, Role, Ticket};

type St = State<Arc<AppState>>;

/// Header with an integer priority; higher is admitted first. Admin keys only: a tenant must not
/// raise itself above others.
pub const PRIORITY_HEADER: &str = "x-serrano-priority";

/// The engine's tenant and priority for this request.
fn tenancy(headers: &HeaderMap, p: &Principal) -> Result<(String, i32), ApiError> {
    let priority = match headers.get(PRIORITY_HEADER) {
        None => 0,
        Some(_) if p.role != Role::Admin => {
            return Err(GovError::Forbidden(format!(
                "{PRIORITY_HEADER} may only be sent with an admin key"
            ))
            .into())
        }
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| (-100..=100).contains(p))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "{PRIORITY_HEADER} must be an integer from -100 to 100"
                ))
            })?,
    };
    Ok((p.tenant.clone(), priority))
}

/// Routes the request, checks the key may use the model, and records the decision on the ticket.
fn scoped_plan(
    st: &AppState,
    ticket: &Ticket,
    p: &Principal,
    requested: Option<&str>,
) -> Result<serrano_router::Plan<Handle>, ApiError> {
    if let Some(m) = requested.filter(|m| !m.is_empty()) {
        // The scope is checked before routing, so a key learns nothing of backends it may not use.
        if !p.may_use_model(m) {
            return Err(
                GovError::Forbidden(format!("This API key may not use the model '{m}'")).into(),
            );
        }
    }
    ticket.set_config_version(st.routing.router.active().version);
    let (model, plan) = st.plan(requested, &p.tenant)?;
    if !p.may_use_model(&model) {
        return Err(
            GovError::Forbidden(format!("This API key may not use the model '{model}'")).into(),
        );
    }
    ticket.set_model(&model);
    let first = &plan.candidates[0];
    let region = &plan.config.backends[first.index].region;
    ticket.set_route(&first.name, region, &plan.reason, plan.version);
    Ok(plan)
}

/// A completion request for the local engine, past the shared checks.
struct Local<T> {
    p: Principal,
    tenant: String,
    priority: i32,
    model: String,
    req: T,
}

/// A completion request past the shared checks: for the local engine, or already answered by
/// an upstream.
enum Admitted<T> {
    Local(Local<T>),
    Forwarded(Response),
}

/// What both completion routes do first: the principal's tenancy and model scope, the tenant's
/// prompt filters, then forwarding when the model is an upstream's, else the typed request.
async fn admit<T: serde::de::DeserializeOwned>(
    st: &AppState,
    ticket: &Ticket,
    headers: &HeaderMap,
    mut raw: serde_json::Value,
    path: &'static str,
) -> Result<Admitted<T>, ApiError> {
    let p = principal(ticket)?;
    let (tenant, priority) = tenancy(headers, &p)?;
    let plan = scoped_plan(st, ticket, &p, raw["model"].as_str())?;
    safety::filter_request(&p, ticket, &mut raw)?;
    match &plan.candidates[0].handle {
        Handle::Local => {
            let model = plan.candidates[0].model.clone();
            Ok(Admitted::Local(Local {
                p,
                tenant,
                priority,
                model,
                req: typed(raw)?,
            }))
        }
        Handle::Remote(_) => {
            let timeout = st.config.request_timeout;
            let route = upstream::Route {
                plan,
                routing: st.routing.clone(),
            };
            let resp = upstream::forward(route, ticket.clone(), &p, path, raw, timeout).await?;
            Ok(Admitted::Forwarded(resp))
        }
    }
}

/// The typed request, once the raw body is known to be for the local engine.
fn typed<T: serde::de::DeserializeOwned>(raw: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(raw).map_err(|e| ApiError::invalid(format!("Invalid JSON body: {e}")))
}

/// Default `max_tokens` for legacy completions, as OpenAI's.
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

fn request_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:016x}{:04x}",
        rand::random::<u64>(),
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

pub async fn models(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
) -> Result<Json<api::ModelList>, ApiError> {
    let p = principal(&ticket)?;
    let config = st.routing.router.active().config.clone();
    let local_context = st
        .engine
        .as_ref()
        .map_or(0, |e| e.info().context_length as u32);
    let data = st
        .routing
        .router
        .models()
        .into_iter()
        .map(|(id, backends)| {
            let local = backends.iter().any(|b| {
                config
                    .backend(b)
                    .is_some_and(|b| b.kind == serrano_router::Kind::Local)
            });
            match local {
                true => (id, "serrano".to_string(), local_context),
                false => (id, backends.join(","), 0),
            }
        })
        .filter(|(n, _, _)| p.may_use_model(n))
        .map(|(id, owned_by, max_model_len)| api::ModelCard {
            id,
            object: "model".into(),
            created: st.started,
            owned_by,
            max_model_len,
        })
        .collect();
    Ok(Json(api::ModelList {
        object: "list".into(),
        data,
    }))
}

fn engine_messages(messages: &[api::ChatMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(c) => c
                    .text()
                    .map_err(|e| ApiError::invalid_param("messages", e))?,
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// Text longer than the context could ever hold is refused before any tokenizing.
fn check_text_len(info: &ModelInfo, param: &str, len: usize) -> Result<(), ApiError> {
    if len > info.max_prompt_bytes() {
        return Err(ApiError::invalid_param(param, format!("the prompt ({len} bytes) is longer than this model's context of {} tokens could hold", info.context_length)));
    }
    Ok(())
}

/// Tokenizes off the async workers: a long prompt must not stall other connections.
async fn encode(
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
async fn chat_prompt(
    info: &Arc<ModelInfo>,
    messages: &[api::ChatMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = engine_messages(messages)?;
    check_text_len(info, "messages", msgs.iter().map(|m| m.content.len()).sum())?;
    let info = info.clone();
    tokio::task::spawn_blocking(move || info.chat_prompt(&msgs, add_generation_prompt))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

pub async fn tokenize(
    State(st): St,
    JsonBody(req): JsonBody<api::TokenizeRequest>,
) -> Result<Json<api::TokenizeResponse>, ApiError> {
    st.model_name(req.model.as_deref())?;
    let info = st.local()?.info();
    let tokens = match (req.prompt, &req.messages) {
        (Some(p), None) => {
            encode(info, "prompt", p, req.add_special_tokens.unwrap_or(true)).await?
        }
        (None, Some(m)) => chat_prompt(info, m, req.add_generation_prompt).await?,
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of 'prompt' or 'messages'",
            ))
        }
    };
    Ok(Json(api::TokenizeResponse {
        count: tokens.len() as u32,
        tokens,
        max_model_len: info.context_length as u32,
    }))
}

pub async fn detokenize(
    State(st): St,
    JsonBody(req): JsonBody<api::DetokenizeRequest>,
) -> Result<Json<api::DetokenizeResponse>, ApiError> {
    st.model_name(req.model.as_deref())?;
    let tok = &st.local()?.info().tokenizer;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                tok.vocab_size()
            ),
        ));
    }
    Ok(Json(api::DetokenizeResponse {
        prompt: tok.decode(&req.tokens, false),
    }))
}

/// Everything a finished (non-streamed) generation produced.
#[derive(Default)]
struct Collected {
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    tokens: Vec<(u32, Option<TokenLogprobs>)>,
    text: String,
    finish: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(
    mut rx: mpsc::Receiver<Event>,
    ticket: Ticket,
    index: usize,
) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    while let Some(e) = rx.recv().await {
        match e {
            Event::PromptLogprobs(p) => c.prompt_logprobs = Some(p),
            Event::Token { id, text, logprobs } => {
                // Counted now; the text goes on the record once filtered.
                ticket.token(index, "");
                c.text.push_str(&text);
                c.tokens.push((id, logprobs));
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                c.finish = Some(reason.as_str());
                ticket.set_finish_reason(reason.as_str());
                c.prompt_tokens = prompt_tokens;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Submits `n` copies of a request (choices, which the engine prefills once); with a seed,
/// choice `i` uses `seed + i` so choices differ yet repeat. All are queued or none.
fn submit_n(
    st: &AppState,
    gen: GenerateRequest,
    n: usize,
) -> Result<Vec<mpsc::Receiver<Event>>, ApiError> {
    let choices = (0..n)
        .map(|i| {
            let mut g = gen.clone();
            g.sampling.seed = gen.sampling.seed.map(|s| s.wrapping_add(i as u64));
            g
        })
        .collect();
    st.local()?.submit_n(choices).map_err(ApiError::from)
}

/// Collects every choice; past `limit` the receivers are dropped, which cancels the sequences.
async fn collect_all(
    rxs: Vec<mpsc::Receiver<Event>>,
    limit: std::time::Duration,
    ticket: &Ticket,
) -> Result<Vec<Collected>, ApiError> {
    let all = rxs
        .into_iter()
        .enumerate()
        .map(|(i, rx)| collect(rx, ticket.clone(), i));
    let cs = tokio::time::timeout(limit, futures::future::try_join_all(all))
        .await
        .map_err(|_| ApiError::timeout(limit))??;
    let u = total_usage(&cs);
    ticket.set_usage(u.prompt_tokens as u64, u.completion_tokens as u64);
    Ok(cs)
}

/// The output filter of a request; log-probs would reveal filtered text, so they are refused
/// when completions are filtered.
fn output_guard(p: &Principal, n: usize, gen: &GenerateRequest) -> Result<OutputGuard, ApiError> {
    let guard = OutputGuard::new(p, n);
    if guard.active() && (gen.logprobs.is_some() || gen.prompt_logprobs.is_some()) {
        return Err(ApiError::invalid_param(
            "logprobs",
            "log-probs are not available while the tenant's policy filters completions",
        ));
    }
    Ok(guard)
}

/// Runs whole (non-streamed) choices through the output filter.
fn filter_collected(
    guard: &mut OutputGuard,
    ticket: &Ticket,
    mut cs: Vec<Collected>,
) -> Vec<Collected> {
    for (i, c) in cs.iter_mut().enumerate() {
        c.text = guard.filter_whole(i, &c.text);
        ticket.append_text(i, &c.text);
        if guard.blocked(i) {
            c.finish = Some(safety::CONTENT_FILTER);
        }
    }
    guard.record(ticket);
    cs
}

/// Reserves the request's worst case: the prompt plus `max_tokens` for every choice.
async fn reserve(ticket: &Ticket, gen: &GenerateRequest, n: usize) -> Result<(), ApiError> {
    let worst = gen.max_tokens.saturating_mul(n) as u64;
    ticket.reserve(gen.prompt.len() as u64, worst).await?;
    Ok(())
}

/// The sending side of an SSE response: forwards chunks, enforces the deadline, counts tokens on
/// the ticket, and writes the audit record before the stream's last chunks.
struct Relay {
    tx: mpsc::Sender<String>,
    ticket: Ticket,
    guard: OutputGuard,
    limit: std::time::Duration,
    deadline: tokio::time::Instant,
    /// The first failure (status, message) seen mid-stream.
    failure: Option<(u16, String)>,
}

impl Relay {
    fn new(
        tx: mpsc::Sender<String>,
        ticket: Ticket,
        guard: OutputGuard,
        limit: std::time::Duration,
    ) -> Relay {
        Relay {
            tx,
            ticket,
            guard,
            limit,
            deadline: tokio::time::Instant::now() + limit,
            failure: None,
        }
    }

    /// Sends one chunk; `false` means the client is gone (the caller returns, and dropping the
    /// receivers and the ticket aborts the sequences and audits a 499).
    async fn send(&self, data: String) -> bool {
        // A client that stops reading must not hold the request (and its reservation) past
        // its deadline.
        matches!(
            tokio::time::timeout_at(self.deadline, self.tx.send(data)).await,
            Ok(Ok(()))
        )
    }

    /// The next event, or `None` at the end or past the deadline (then an error event is sent).
    async fn next(&mut self, events: &mut Merged) -> Option<(u32, Event)> {
        match tokio::time::timeout_at(self.deadline, events.next()).await {
            Ok(e) => e,
            Err(_) => {
                let e = ApiError::timeout(self.limit);
                self.failure
                    .get_or_insert((e.status.as_u16(), e.message.clone()));
                let _ = self.tx.send(to_json(&e.body())).await;
                None
            }
        }
    }

    /// A mid-stream engine failure: an error event, recorded.
    fn engine_error(&mut self, e: String) -> String {
        tracing::error!("generation failed mid-stream: {e}");
        let err = ApiError::internal(&e);
        self.failure.get_or_insert((err.status.as_u16(), e));
        to_json(&err.body())
    }

    /// A token of choice `i`: counted, then what the output filter lets through (`None` once
    /// the choice is blocked).
    fn token(&mut self, i: usize, text: &str) -> Option<String> {
        let shown = self.guard.push(i, text);
        self.ticket.token(i, &shown);
        (!self.guard.blocked(i)).then_some(shown)
    }

    /// The end of choice `i`: held-back text, and the finish reason to report.
    fn end(&mut self, i: usize, reason: FinishReason) -> (String, &'static str) {
        let rest = self.guard.finish(i);
        self.ticket.append_text(i, &rest);
        let reason = self.guard.finish_reason(i, reason.as_str());
        self.ticket.set_finish_reason(reason);
        (rest, reason)
    }

    /// Writes the audit record (and settles); `true` if the stream may end normally.
    async fn close(&mut self, complete: bool) -> bool {
        self.guard.record(&self.ticket);
        let (status, error) = match self.failure.take() {
            Some((s, e)) => (s, Some(e)),
            None if complete => (200, None),
            None => (500, Some("the engine ended the stream early".into())),
        };
        match self.ticket.finish(status, error).await {
            Ok(_) => true,
            Err(e) => {
                let _ = self.tx.send(to_json(&ApiError::from(e).body())).await;
                false
            }
        }
    }
}

type Merged = futures::stream::SelectAll<futures::stream::BoxStream<'static, (u32, Event)>>;

/// Every choice's events in arrival order, tagged with the choice index.
fn merged(
    rxs: Vec<mpsc::Receiver<Event>>,
) -> futures::stream::SelectAll<futures::stream::BoxStream<'static, (u32, Event)>> {
    futures::stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| ReceiverStream::new(rx).map(move |e| (i as u32, e)).boxed()),
    )
}

/// Usage of all choices: the prompt counted once, completions summed.
fn total_usage(cs: &[Collected]) -> api::Usage {
    usage(
        cs.first().map_or(0, |c| c.prompt_tokens),
        cs.iter().map(|c| c.completion_tokens).sum(),
    )
}

/// How tokens are named in log-prob listings.
struct TokenNamer<'a> {
    info: &'a ModelInfo,
    as_ids: bool,
}

impl TokenNamer<'_> {
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
}

/// Appends one token to a legacy `logprobs` object.
fn push_completion_logprob(
    out: &mut api::CompletionLogprobs,
    namer: &TokenNamer<'_>,
    id: u32,
    lp: Option<&TokenLogprobs>,
    offset: &mut u32,
) {
    out.tokens.push(namer.name(id));
    out.token_logprobs.push(lp.map(|l| l.logprob));
    out.top_logprobs.push(lp.map(|l| namer.top_map(l)));
    out.text_offset.push(*offset);
    *offset += namer.info.tokenizer.token_text(id).chars().count() as u32;
}

fn chat_logprob(namer: &TokenNamer<'_>, lp: &TokenLogprobs) -> api::ChatTokenLogprob {
    let tok = &namer.info.tokenizer;
    api::ChatTokenLogprob {
        token: namer.name(lp.token),
        logprob: lp.logprob,
        bytes: Some(tok.token_bytes(lp.token).to_vec()),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, l)| api::ChatTopLogprob {
                token: namer.name(t),
                logprob: l,
                bytes: Some(tok.token_bytes(t).to_vec()),
            })
            .collect(),
    }
}

fn usage(prompt: usize, completion: usize) -> api::Usage {
    api::Usage::new(prompt as u32, completion as u32)
}

/// An SSE response whose events are the strings received (each becomes one `data:` line).
pub(crate) fn sse_response(rx: mpsc::Receiver<String>) -> Response {
    let stream =
        ReceiverStream::new(rx).map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(stream).into_response()
}

/// An error as the JSON of an SSE event.
pub(crate) fn error_json(e: &ApiError) -> String {
    to_json(&e.body())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Wire types are plain data; serialization cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

// ---------------------------------------------------------------- /v1/completions

pub async fn completions(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let Local {
        p,
        tenant,
        priority,
        model,
        req,
    } = match admit::<api::CompletionRequest>(&st, &ticket, &headers, raw, "/completions").await? {
        Admitted::Local(l) => l,
        Admitted::Forwarded(resp) => return Ok(resp),
    };
    let info = st.local()?.info().clone();
    let n = params::choices(&req.sampling)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let prompt = match req.prompt {
        api::PromptSpec::Text(s) => encode(&info, "prompt", s, true).await?,
        api::PromptSpec::Texts(mut v) if v.len() == 1 => {
            encode(&info, "prompt", v.remove(0), true).await?
        }
        api::PromptSpec::Tokens(t) => t,
        api::PromptSpec::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(ApiError::invalid_param(
                "prompt",
                "batched prompts are not supported yet; send one prompt per request",
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    let n_logprobs = req.logprobs.map(|n| n as usize);
    if n_logprobs.is_some_and(|n| n > serrano_engine::MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("logprobs must be at most {}", serrano_engine::MAX_LOGPROBS),
        ));
    }
    let gen = GenerateRequest {
        sampling: params::sampling(&req.sampling, info.config.vocab_size)?,
        max_tokens: req
            .max_tokens
            .map_or(DEFAULT_COMPLETION_MAX_TOKENS, |m| m as usize),
        stop: params::stops(&req.sampling)?,
        stop_token_ids: params::stop_token_ids(&req.sampling, info.config.vocab_size)?,
        ignore_eos: req.sampling.ignore_eos,
        logprobs: n_logprobs,
        prompt_logprobs: if req.echo { n_logprobs } else { None },
        prompt: prompt.clone(),
        tenant,
        priority,
    };
    if ticket.keeps_content() {
        ticket.set_prompt_text(info.tokenizer.decode(&gen.prompt, false));
    }
    let mut guard = output_guard(&p, n, &gen)?;
    reserve(&ticket, &gen, n).await?;
    let rxs = submit_n(&st, gen, n).inspect_err(|_| ticket.set_usage(0, 0))?;
    let ctx = CompletionCtx {
        id: request_id("cmpl"),
        created: unix_now(),
        model,
        echo: req.echo,
        as_ids: req.return_tokens_as_token_ids,
        logprobs: n_logprobs.is_some(),
        prompt,
        info,
    };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
        let (tx, out) = mpsc::channel(64);
        ticket.detach();
        tokio::spawn(stream_completion(
            ctx,
            rxs,
            Relay::new(tx, ticket, guard, st.config.request_timeout),
            include_usage,
        ));
        return Ok(sse_response(out));
    }
    let cs = filter_collected(
        &mut guard,
        &ticket,
        collect_all(rxs, st.config.request_timeout, &ticket).await?,
    );
    Ok(Json(ctx.finish(cs)).into_response())
}

struct CompletionCtx {
    id: String,
    created: u64,
    model: String,
    echo: bool,
    as_ids: bool,
    logprobs: bool,
    prompt: Vec<u32>,
    info: Arc<ModelInfo>,
}

impl CompletionCtx {
    fn namer(&self) -> TokenNamer<'_> {
        TokenNamer {
            info: &self.info,
            as_ids: self.as_ids,
        }
    }

    fn response(
        &self,
        choices: Vec<api::CompletionChoice>,
        usage: Option<api::Usage>,
    ) -> api::Completion {
        api::Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }

    fn prompt_text(&self) -> String {
        self.info.tokenizer.decode(&self.prompt, false)
    }

    /// The echoed prompt's entries of a `logprobs` object.
    fn prompt_logprobs(
        &self,
        entries: Option<&[Option<TokenLogprobs>]>,
        out: &mut api::CompletionLogprobs,
        offset: &mut u32,
    ) {
        let namer = self.namer();
        for (i, &id) in self.prompt.iter().enumerate() {
            let lp = entries.and_then(|e| e.get(i)).and_then(|e| e.as_ref());
            push_completion_logprob(out, &namer, id, lp, offset);
        }
    }

    fn finish(&self, cs: Vec<Collected>) -> api::Completion {
        let u = total_usage(&cs);
        let choices = cs
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.choice(i as u32, c))
            .collect();
        self.response(choices, Some(u))
    }

    fn choice(&self, index: u32, c: Collected) -> api::CompletionChoice {
        let mut text = if self.echo {
            self.prompt_text()
        } else {
            String::new()
        };
        text.push_str(&c.text);
        let logprobs = self.logprobs.then(|| {
            let mut lp = api::CompletionLogprobs::default();
            let mut offset = 0;
            if self.echo {
                self.prompt_logprobs(c.prompt_logprobs.as_deref(), &mut lp, &mut offset);
            }
            let namer = self.namer();
            for (id, l) in &c.tokens {
                push_completion_logprob(&mut lp, &namer, *id, l.as_ref(), &mut offset);
            }
            lp
        });
        api::CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: c.finish.map(str::to_string),
        }
    }

    fn chunk(
        &self,
        index: u32,
        text: String,
        logprobs: Option<api::CompletionLogprobs>,
        finish: Option<&str>,
    ) -> String {
        to_json(&self.response(
            vec![api::CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: finish.map(str::to_string),
            }],
            None,
        ))
    }
}

async fn stream_completion(
    ctx: CompletionCtx,
    rxs: Vec<mpsc::Receiver<Event>>,
    mut out: Relay,
    include_usage: bool,
) {
    let n = rxs.len();
    let mut events = merged(rxs);
    let mut offset = vec![0u32; n];
    let mut echoed = vec![!ctx.echo; n];
    let (mut finished, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
    // Without prompt log-probs the echo can go out at once; with them, when they arrive.
    if ctx.echo && !ctx.logprobs {
        for (i, e) in echoed.iter_mut().enumerate() {
            *e = true;
            if !out
                .send(ctx.chunk(i as u32, ctx.prompt_text(), None, None))
                .await
            {
                return;
            }
        }
    }
    while let Some((i, e)) = out.next(&mut events).await {
        let k = i as usize;
        let msg = match e {
            Event::PromptLogprobs(p) if !echoed[k] => {
                echoed[k] = true;
                let mut lp = api::CompletionLogprobs::default();
                ctx.prompt_logprobs(Some(&p), &mut lp, &mut offset[k]);
                ctx.chunk(i, ctx.prompt_text(), Some(lp), None)
            }
            Event::PromptLogprobs(_) => continue,
            Event::Token { id, text, logprobs } => {
                let Some(text) = out.token(k, &text) else {
                    continue;
                };
                if text.is_empty() && !ctx.logprobs {
                    continue;
                }
                let lp = ctx.logprobs.then(|| {
                    let mut lp = api::CompletionLogprobs::default();
                    push_completion_logprob(
                        &mut lp,
                        &ctx.namer(),
                        id,
                        logprobs.as_ref(),
                        &mut offset[k],
                    );
                    lp
                });
                ctx.chunk(i, text, lp, None)
            }
            Event::Finished {
                reason,
                prompt_tokens: p,
                completion_tokens: c,
            } => {
                finished += 1;
                prompt_tokens = p;
                completion_tokens += c;
                let (rest, reason) = out.end(k, reason);
                ctx.chunk(i, rest, None, Some(reason))
            }
            Event::Error(e) => out.engine_error(e),
        };
        if !out.send(msg).await {
            return;
        }
        if finished == n {
            break;
        }
    }
    if finished == n {
        out.ticket
            .set_usage(prompt_tokens as u64, completion_tokens as u64);
    }
    if !out.close(finished == n).await {
        return;
    }
    if include_usage && finished == n {
        let u = ctx.response(vec![], Some(usage(prompt_tokens, completion_tokens)));
        if !out.send(to_json(&u)).await {
            return;
        }
    }
    out.send("[DONE]".into()).await;
}

// ---------------------------------------------------------------- /v1/chat/completions

pub async fn chat_completions(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let Local {
        p,
        tenant,
        priority,
        model,
        req,
    } = match admit::<api::ChatCompletionRequest>(&st, &ticket, &headers, raw, "/chat/completions")
        .await?
    {
        Admitted::Local(l) => l,
        Admitted::Forwarded(resp) => return Ok(resp),
    };
    let info = st.local()?.info().clone();
    let n = params::choices(&req.sampling)?;
    let prompt = chat_prompt(&info, &req.messages, true).await?;
    let top = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ))
        }
        (false, None) => None,
        (true, n) => Some(n.unwrap_or(0) as usize),
    };
    if top.is_some_and(|n| n > serrano_engine::MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!(
                "top_logprobs must be at most {}",
                serrano_engine::MAX_LOGPROBS
            ),
        ));
    }
    // Without a limit, a chat may use the rest of the context, as OpenAI's does.
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(m) => m as usize,
        None => info.context_length.saturating_sub(prompt.len()).max(1),
    };
    let gen = GenerateRequest {
        sampling: params::sampling(&req.sampling, info.config.vocab_size)?,
        max_tokens,
        stop: params::stops(&req.sampling)?,
        stop_token_ids: params::stop_token_ids(&req.sampling, info.config.vocab_size)?,
        ignore_eos: req.sampling.ignore_eos,
        logprobs: top,
        prompt_logprobs: None,
        prompt,
        tenant,
        priority,
    };
    if ticket.keeps_content() {
        ticket.set_prompt_text(to_json(&req.messages));
    }
    let mut guard = output_guard(&p, n, &gen)?;
    reserve(&ticket, &gen, n).await?;
    let rxs = submit_n(&st, gen, n).inspect_err(|_| ticket.set_usage(0, 0))?;
    let ctx = ChatCtx {
        id: request_id("chatcmpl"),
        created: unix_now(),
        model,
        logprobs: top.is_some(),
        info,
    };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
        let (tx, out) = mpsc::channel(64);
        ticket.detach();
        tokio::spawn(stream_chat(
            ctx,
            rxs,
            Relay::new(tx, ticket, guard, st.config.request_timeout),
            include_usage,
        ));
        return Ok(sse_response(out));
    }
    let cs = filter_collected(
        &mut guard,
        &ticket,
        collect_all(rxs, st.config.request_timeout, &ticket).await?,
    );
    let namer = TokenNamer {
        info: &ctx.info,
        as_ids: false,
    };
    let u = total_usage(&cs);
    let choices = cs
        .into_iter()
        .enumerate()
        .map(|(i, c)| api::ChatChoice {
            index: i as u32,
            logprobs: ctx.logprobs.then(|| api::ChatLogprobs {
                content: c
                    .tokens
                    .iter()
                    .filter_map(|(_, l)| l.as_ref())
                    .map(|l| chat_logprob(&namer, l))
                    .collect(),
            }),
            message: api::AssistantMessage {
                role: "assistant".into(),
                content: Some(c.text),
            },
            finish_reason: c.finish.map(str::to_string),
        })
        .collect();
    Ok(Json(api::ChatCompletion {
        id: ctx.id,
        object: "chat.completion".into(),
        created: ctx.created,
        model: ctx.model,
        choices,
        usage: u,
        system_fingerprint: None,
    })
    .into_response())
}

struct ChatCtx {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    info: Arc<ModelInfo>,
}

impl ChatCtx {
    fn chunk(
        &self,
        choices: Vec<api::ChatChunkChoice>,
        include_usage: bool,
        usage: Option<api::Usage>,
    ) -> String {
        to_json(&api::ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: include_usage.then_some(usage),
            system_fingerprint: None,
        })
    }

    fn delta(
        &self,
        index: u32,
        delta: api::ChatDelta,
        logprobs: Option<api::ChatLogprobs>,
        finish: Option<&str>,
        include_usage: bool,
    ) -> String {
        self.chunk(
            vec![api::ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish.map(str::to_string),
            }],
            include_usage,
            None,
        )
    }
}

async fn stream_chat(
    ctx: ChatCtx,
    rxs: Vec<mpsc::Receiver<Event>>,
    mut out: Relay,
    include_usage: bool,
) {
    let n = rxs.len();
    for i in 0..n {
        let first = api::ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        if !out
            .send(ctx.delta(i as u32, first, None, None, include_usage))
            .await
        {
            return;
        }
    }
    let namer = TokenNamer {
        info: &ctx.info,
        as_ids: false,
    };
    let mut events = merged(rxs);
    let (mut finished, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
    while let Some((i, e)) = out.next(&mut events).await {
        let msg = match e {
            Event::PromptLogprobs(_) => continue,
            Event::Token { text, logprobs, .. } => {
                let Some(text) = out.token(i as usize, &text) else {
                    continue;
                };
                if text.is_empty() && !ctx.logprobs {
                    continue;
                }
                let lp = ctx.logprobs.then(|| api::ChatLogprobs {
                    content: logprobs.iter().map(|l| chat_logprob(&namer, l)).collect(),
                });
                ctx.delta(
                    i,
                    api::ChatDelta {
                        role: None,
                        content: Some(text),
                    },
                    lp,
                    None,
                    include_usage,
                )
            }
            Event::Finished {
                reason,
                prompt_tokens: p,
                completion_tokens: c,
            } => {
                finished += 1;
                prompt_tokens = p;
                completion_tokens += c;
                let (rest, reason) = out.end(i as usize, reason);
                let delta = api::ChatDelta {
                    role: None,
                    content: (!rest.is_empty()).then_some(rest),
                };
                ctx.delta(i, delta, None, Some(reason), include_usage)
            }
            Event::Error(e) => out.engine_error(e),
        };
        if !out.send(msg).await {
            return;
        }
        if finished == n {
            break;
        }
    }
    if finished == n {
        out.ticket
            .set_usage(prompt_tokens as u64, completion_tokens as u64);
    }
    if !out.close(finished == n).await {
        return;
    }
    if include_usage
        && finished == n
        && !out
            .send(ctx.chunk(vec![], true, Some(usage(prompt_tokens, completion_tokens))))
            .await
    {
        return;
    }
    out.send("[DONE]".into()).await;
}
