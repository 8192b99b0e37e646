//! An OpenAI-compatible upstream (another serrano, llama.cpp's llama-server, vLLM, a hosted API)
//! behind the same governance as the local engine: the request is checked, its worst case
//! reserved, forwarded unchanged but for a guaranteed `max_tokens`, and settled from the
//! upstream's reported usage. Streams pass through chunk by chunk.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use serrano_gov::Ticket;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::safety::{self, OutputGuard};
use serrano_gov::Principal;

/// Most choices a forwarded request may ask for, as for the local engine.
const MAX_CHOICES: u64 = 16;
/// Longest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// One upstream server.
pub struct Upstream {
    pub name: String,
    /// Base URL including `/v1`.
    pub base: String,
    /// Context lengths the upstream reported (`max_model_len`), by its model id.
    learned_context: std::sync::RwLock<HashMap<String, u64>>,
    /// The config's context length, for upstreams that report none.
    context_length: Option<u64>,
    /// Put into requests without `max_tokens` (at most the rest of the model's context, when
    /// known), so the reservation bounds what is generated.
    pub default_max_tokens: u64,
    /// Whole-request limit; `None`: the server's.
    timeout: Option<Duration>,
    key: Option<String>,
    client: reqwest::Client,
}

/// Why an attempt failed, and whether another backend may be tried.
enum SendError {
    /// Connect error, timeout, 5xx, 429: the request may go elsewhere.
    Retryable(ApiError),
    /// The backend refused the request itself (4xx): another would too.
    Final(ApiError),
}

impl Upstream {
    /// A client for a config's `openai` backend; its key is read from the environment here.
    pub fn from_backend(
        b: &serrano_router::config::Backend,
        request_timeout: Duration,
    ) -> Result<Upstream, String> {
        let base = b.url.clone().ok_or("no url")?;
        let key = match &b.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| format!("${var} is not set"))?),
            None => None,
        };
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(b.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Upstream {
            name: b.name.clone(),
            base: base.trim_end_matches('/').to_string(),
            learned_context: Default::default(),
            context_length: b.context_length,
            default_max_tokens: b.default_max_tokens,
            timeout: b
                .timeout_ms
                .map(|t| Duration::from_millis(t).min(request_timeout)),
            key,
            client,
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.post(format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// The context length of one of its models, when known.
    pub fn context_for(&self, model: &str) -> Option<u64> {
        let learned = self
            .learned_context
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied();
        learned.or(self.context_length)
    }

    /// Remembers the context lengths a model listing reported.
    pub fn learn_contexts(&self, models: &[(String, Option<u64>)]) {
        let mut map = self
            .learned_context
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for (m, c) in models {
            if let Some(c) = c {
                map.insert(m.clone(), *c);
            }
        }
    }

    /// POSTs a request; a refusal or failure becomes the error to answer with.
    async fn send(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<reqwest::Response, SendError> {
        let resp = self
            .post(path)
            .json(body)
            .timeout(self.timeout.unwrap_or(timeout))
            .send()
            .await
            .map_err(|e| SendError::Retryable(upstream_error(self, e)))?;
        let status = resp.status();
        if !status.is_success() {
            let e = relay_status(self, resp).await;
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                SendError::Retryable(e)
            } else {
                SendError::Final(e)
            });
        }
        Ok(resp)
    }

    /// The upstream's model ids and, where reported (vLLM, serrano), context lengths.
    pub async fn discover_models(&self) -> Result<Vec<(String, Option<u64>)>, String> {
        let mut r = self.client.get(format!("{}/models", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        let v: Value = r
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        let id = m["id"].as_str()?.to_string();
                        Some((id, m["max_model_len"].as_u64().filter(|&c| c > 0)))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

fn upstream_error(up: &Upstream, detail: impl std::fmt::Display) -> ApiError {
    tracing::warn!(backend = %up.name, "upstream failed: {detail}");
    ApiError {
        code: Some("upstream_error".into()),
        ..ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("The backend '{}' failed to answer", up.name),
        )
    }
}

/// A bound on the prompt's tokens without the upstream's tokenizer: a byte-level BPE token
/// covers at least one byte, and every byte that can reach the prompt (messages, tool schemas,
/// response formats, template text standing for JSON punctuation) is in the request body, so
/// its length bounds the prompt with room to spare.
fn prompt_bound(body: &Value) -> u64 {
    serde_json::to_string(body).map_or(u64::MAX, |s| s.len() as u64)
}

/// Largest `max_tokens` forwarded when the upstream did not report the model's context.
const MAX_FORWARDED_MAX_TOKENS: u64 = 1 << 20;
/// Largest upstream response body read whole.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Fields that change how much an upstream generates and that the reservation does not cover.
const UNBOUNDED_FIELDS: &[&str] = &["best_of", "n_predict", "max_new_tokens", "min_tokens"];

/// The request's choice count: 1 to 16, a JSON integer (a `"4"` that an upstream would coerce
/// is refused, since it would escape both the reservation and the output filter).
fn choices(body: &Value) -> Result<u64, ApiError> {
    match &body["n"] {
        Value::Null => Ok(1),
        v => v
            .as_u64()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "n",
                    format!("n must be an integer from 1 to {MAX_CHOICES}"),
                )
            }),
    }
}

/// The remote candidates of a routing plan, in the order to try them.
pub struct Route {
    pub plan: serrano_router::Plan<crate::routing::Handle>,
    pub routing: Arc<crate::routing::Routing>,
}

impl Route {
    fn remotes(
        &self,
    ) -> Vec<(
        Arc<Upstream>,
        &serrano_router::Candidate<crate::routing::Handle>,
    )> {
        self.plan
            .candidates
            .iter()
            .filter_map(|c| match &c.handle {
                crate::routing::Handle::Remote(up) => Some((up.clone(), c)),
                crate::routing::Handle::Local => None,
            })
            .collect()
    }

    fn region(&self, c: &serrano_router::Candidate<crate::routing::Handle>) -> &str {
        &self.plan.config.backends[c.index].region
    }
}

/// Forwards a chat or legacy completion (`path` is `/chat/completions` or `/completions`) to
/// the plan's first remote candidate, falling back to the next ones on connect errors,
/// timeouts and 5xx before anything reached the client.
pub async fn forward(
    route: Route,
    ticket: Ticket,
    p: &Principal,
    path: &'static str,
    mut body: Value,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let remotes = route.remotes();
    let Some((first, _)) = remotes.first() else {
        return Err(ApiError::internal(
            "a plan without remote backends was forwarded",
        ));
    };
    let n = choices(&body)?;
    body["n"] = Value::from(n);
    for f in UNBOUNDED_FIELDS {
        if let Some(o) = body.as_object_mut() {
            o.remove(*f);
        }
    }
    let mut guard = OutputGuard::new(p, n as usize);
    let stream = body["stream"].as_bool().unwrap_or(false);
    if guard.active() {
        if body["logprobs"].as_bool() == Some(true)
            || !body["logprobs"].is_boolean() && !body["logprobs"].is_null()
        {
            return Err(ApiError::invalid_param(
                "logprobs",
                "log-probs are not available while the tenant's policy filters completions",
            ));
        }
        if stream && (!body["tools"].is_null() || !body["functions"].is_null()) {
            return Err(ApiError::invalid_param(
                "stream",
                "streamed tool calls cannot be filtered; send tools with stream: false",
            ));
        }
    }
    let bound = prompt_bound(&body);
    // The smallest context any candidate is known to have bounds what may be asked of all.
    let ceiling = remotes
        .iter()
        .filter_map(|(up, c)| up.context_for(&c.model))
        .min()
        .unwrap_or(MAX_FORWARDED_MAX_TOKENS);
    let requested = match (&body["max_completion_tokens"], &body["max_tokens"]) {
        (Value::Null, Value::Null) => None,
        (Value::Null, v) | (v, _) => Some(
            v.as_u64()
                .filter(|m| (1..=ceiling).contains(m))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "max_tokens",
                        format!("max_tokens must be an integer from 1 to {ceiling}"),
                    )
                })?,
        ),
    };
    let max_tokens = requested.unwrap_or_else(|| {
        first
            .default_max_tokens
            .min(ceiling - bound.min(ceiling - 1))
    });
    // Both spellings carry the reserved bound, whichever one the upstream reads.
    body["max_tokens"] = Value::from(max_tokens);
    if path == "/chat/completions" {
        body["max_completion_tokens"] = Value::from(max_tokens);
    }
    if ticket.keeps_content() {
        let prompt = if path == "/chat/completions" {
            &body["messages"]
        } else {
            &body["prompt"]
        };
        ticket.set_prompt_text(prompt.to_string());
    }
    ticket.set_fallbacks(
        remotes
            .iter()
            .skip(1)
            .map(|(_, c)| c.name.clone())
            .collect(),
    );
    let worst = (bound, n.saturating_mul(max_tokens));
    ticket.reserve(worst.0, worst.1).await?;
    // Until an upstream answers, nothing was used.
    let failed = |e: ApiError| {
        ticket.set_usage(0, 0);
        e
    };
    let wants_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let metrics = &route.routing.metrics;
    let backoff = Duration::from_millis(route.plan.config.routing.backoff_ms);
    let mut waited = Duration::ZERO;
    let mut last_error = None;
    let mut tried: Vec<String> = Vec::new();
    for (i, (up, cand)) in remotes.iter().enumerate() {
        if i > 0 {
            // Exponential backoff with jitter, so retries of many requests do not align.
            let d =
                backoff.mul_f64(f64::from(1u32 << (i - 1).min(10)) * rand::random_range(0.5..1.5));
            tokio::time::sleep(d).await;
            waited += d;
        }
        let Some(attempt) = cand.state.begin(Instant::now()) else {
            tried.push(format!("{} unavailable", cand.name));
            continue;
        };
        let mut reason = route.plan.reason.clone();
        if !tried.is_empty() {
            reason = format!(
                "{reason}; fell back to {} after {}",
                cand.name,
                tried.join(", ")
            );
        }
        ticket.set_route(&cand.name, route.region(cand), &reason, route.plan.version);
        body["model"] = Value::from(cand.model.clone());
        let sent = Instant::now();
        let resp = match up.send(path, &body, timeout).await {
            Ok(r) => r,
            Err(SendError::Retryable(e)) => {
                metrics.finish(attempt, serrano_router::Outcome::Failed, None);
                waited += sent.elapsed();
                tried.push(format!("{} failed", cand.name));
                last_error = Some(e);
                continue;
            }
            Err(SendError::Final(e)) => {
                metrics.finish(attempt, serrano_router::Outcome::Refused, None);
                return Err(failed(e));
            }
        };
        if stream {
            let (tx, rx) = mpsc::channel(64);
            ticket.detach();
            metrics.gateway_overhead(ticket.elapsed().saturating_sub(waited + sent.elapsed()));
            let relay = StreamRelay {
                up: up.clone(),
                ticket,
                guard,
                tx,
                wants_usage,
                worst,
                deadline: tokio::time::Instant::now() + timeout,
                attempt: Some(attempt),
                routing: route.routing.clone(),
                sent,
            };
            tokio::spawn(relay.run(resp));
            return Ok(crate::openai::sse_response(rx));
        }
        // A body that breaks off is a failure like any other: nothing reached the client yet.
        let parsed = match read_capped(resp, MAX_RESPONSE_BYTES).await {
            Ok(bytes) => serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let latency = sent.elapsed();
        waited += latency;
        let mut v = match parsed {
            Ok(v) => v,
            Err(e) => {
                metrics.finish(attempt, serrano_router::Outcome::Failed, None);
                tried.push(format!("{} failed", cand.name));
                last_error = Some(upstream_error(up, e));
                continue;
            }
        };
        let ttft_ms = latency.as_secs_f64() * 1e3;
        metrics.finish(
            attempt,
            serrano_router::Outcome::Ok {
                ttft_ms,
                itl_ms: None,
            },
            Some(latency),
        );
        filter_choices(&mut guard, &ticket, &mut v);
        record_choices(&ticket, &v);
        if !record_usage(&ticket, &v["usage"]) {
            // Without the upstream's count, charge the worst case reserved.
            ticket.set_usage(worst.0, worst.1);
        }
        metrics.gateway_overhead(ticket.elapsed().saturating_sub(waited));
        return Ok(axum::Json(v).into_response());
    }
    Err(failed(last_error.unwrap_or_else(|| ApiError {
        code: Some("no_backend_available".into()),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("no backend could take the request: {}", tried.join(", ")),
        )
    })))
}

/// A response body, refused past `cap` bytes.
async fn read_capped(resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if out.len() + chunk.len() > cap {
            return Err(format!("the response is larger than {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An upstream's refusal: client errors (4xx) pass through with the upstream's message;
/// anything else is 502.
async fn relay_status(up: &Upstream, resp: reqwest::Response) -> ApiError {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let msg = body["error"]["message"].as_str().unwrap_or("").to_string();
    match StatusCode::from_u16(status.as_u16()) {
        Ok(s)
            if s.is_client_error()
                && s != StatusCode::UNAUTHORIZED
                && s != StatusCode::FORBIDDEN =>
        {
            ApiError::new(
                s,
                "invalid_request_error",
                format!("The backend '{}' refused the request: {msg}", up.name),
            )
        }
        _ => upstream_error(up, format!("status {status}: {msg}")),
    }
}

/// Runs a whole response's choices through the output filter and the tool allowlist.
fn filter_choices(guard: &mut OutputGuard, ticket: &Ticket, v: &mut Value) {
    for (i, c) in v["choices"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if guard.active() {
            strip_unfiltered(c);
            for call in c["message"]["tool_calls"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                let args = &mut call["function"]["arguments"];
                if let Some(a) = args.as_str() {
                    *args = Value::String(guard.redact_once(a));
                }
            }
        }
        if let Some(name) = c["message"]["function_call"]["name"]
            .as_str()
            .map(String::from)
        {
            ticket.add_tool_calls(&[name.as_str()]);
            if !guard.tools_allowed(ticket, &[name.as_str()]) {
                c["message"]["function_call"] = Value::Null;
                c["finish_reason"] = Value::from(safety::CONTENT_FILTER);
            }
        }
        let names: Vec<String> = tool_call_names(&c["message"]);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        ticket.add_tool_calls(&refs);
        if !guard.tools_allowed(ticket, &refs) {
            c["message"]["tool_calls"] = Value::Null;
            c["finish_reason"] = Value::from(safety::CONTENT_FILTER);
        }
        let field = if c["message"]["content"].is_string() {
            &mut c["message"]["content"]
        } else {
            &mut c["text"]
        };
        if let Some(text) = field.as_str() {
            *field = Value::String(guard.filter_whole(i, text));
        }
        if guard.blocked(i) {
            c["finish_reason"] = Value::from(safety::CONTENT_FILTER);
        }
    }
    guard.record(ticket);
}

fn tool_call_names(message: &Value) -> Vec<String> {
    message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["function"]["name"].as_str().map(String::from))
        .collect()
}

/// Text-bearing fields the output filter does not scan: dropped when it is on, so nothing it
/// would have redacted can leave through them (token log-probs, reasoning, non-string content).
fn strip_unfiltered(c: &mut Value) {
    if let Some(o) = c.as_object_mut() {
        o.remove("logprobs");
    }
    for part in ["message", "delta"] {
        if let Some(m) = c[part].as_object_mut() {
            m.remove("reasoning_content");
            m.remove("reasoning");
            if m.get("content")
                .is_some_and(|v| !v.is_string() && !v.is_null())
            {
                m.insert("content".into(), Value::Null);
            }
        }
    }
}

/// Runs one streamed chunk through the output filter; `Err` names a tool that is not allowed.
fn filter_chunk(guard: &mut OutputGuard, ticket: &Ticket, v: &mut Value) -> Result<(), String> {
    for c in v["choices"].as_array_mut().into_iter().flatten() {
        if guard.active() {
            strip_unfiltered(c);
        }
        let i = c["index"].as_u64().unwrap_or(0) as usize;
        let names = tool_call_names(&c["delta"]);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        ticket.add_tool_calls(&refs);
        if !guard.tools_allowed(ticket, &refs) {
            return Err(format!(
                "the model called a tool this key may not use ({})",
                refs.join(", ")
            ));
        }
        let key = if c["delta"].is_object() {
            "delta"
        } else {
            "text"
        };
        let current = match key {
            "delta" => c["delta"]["content"].as_str(),
            _ => c["text"].as_str(),
        };
        let had_text = current.is_some();
        let mut shown = current.map(|t| guard.push(i, t)).unwrap_or_default();
        if let Some(reason) = c["finish_reason"].as_str().map(String::from) {
            shown.push_str(&guard.finish(i));
            c["finish_reason"] = Value::from(guard.finish_reason(i, &reason));
        }
        if had_text || !shown.is_empty() {
            match key {
                "delta" => c["delta"]["content"] = Value::String(shown),
                _ => c["text"] = Value::String(shown),
            }
        }
    }
    Ok(())
}

fn record_choices(ticket: &Ticket, v: &Value) {
    for (i, c) in v["choices"].as_array().into_iter().flatten().enumerate() {
        let text = c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap_or("");
        if !text.is_empty() {
            ticket.token(i, text);
        }
        if let Some(r) = c["finish_reason"].as_str() {
            ticket.set_finish_reason(r);
        }
    }
}

/// The upstream's usage wins over the chunk tally; without it, the tally stands (one token per
/// content chunk) and the prompt stays at its reserved bound.
fn record_usage(ticket: &Ticket, usage: &Value) -> bool {
    if let (Some(p), Some(c)) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    ) {
        ticket.set_usage(p, c);
        return true;
    }
    false
}

/// The sending side of a forwarded stream.
struct StreamRelay {
    up: Arc<Upstream>,
    ticket: Ticket,
    guard: OutputGuard,
    tx: mpsc::Sender<String>,
    wants_usage: bool,
    /// (prompt bound, completion tokens) reserved: charged if the upstream reports no usage.
    worst: (u64, u64),
    deadline: tokio::time::Instant,
    /// The backend's slot, ended with the stream's outcome and timings.
    attempt: Option<serrano_router::Attempt>,
    routing: Arc<crate::routing::Routing>,
    sent: Instant,
}

impl StreamRelay {
    /// Sends one event; `false` if the client is gone or stopped reading past the deadline
    /// (then dropping the ticket audits a 499 and settles).
    async fn send(&self, data: String) -> bool {
        matches!(
            tokio::time::timeout_at(self.deadline, self.tx.send(data)).await,
            Ok(Ok(()))
        )
    }

    async fn run(mut self, resp: reqwest::Response) {
        let mut bytes = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut failure: Option<String> = None;
        let mut violation: Option<String> = None;
        let (mut done, mut saw_usage) = (false, false);
        // Token timings for the backend's latency estimates: first content, last, count.
        let (mut first, mut last, mut chunks) = (None::<Instant>, None::<Instant>, 0u32);
        'read: while let Some(chunk) = bytes.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            };
            buf.extend_from_slice(&chunk);
            while let Some(end) = find_event_end(&buf) {
                let event: Vec<u8> = buf.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&event[..end.0]);
                for data in text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim)
                {
                    if data == "[DONE]" {
                        done = true;
                        break 'read;
                    }
                    let Ok(mut v) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    let is_usage_only = v["choices"].as_array().is_some_and(|c| c.is_empty());
                    if let Err(e) = filter_chunk(&mut self.guard, &self.ticket, &mut v) {
                        violation = Some(e);
                        break 'read;
                    }
                    saw_usage |= record_stream_chunk(&self.ticket, &v);
                    if !is_usage_only {
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = Some(now);
                        chunks += 1;
                    }
                    if is_usage_only && !self.wants_usage {
                        continue;
                    }
                    if !self.send(v.to_string()).await {
                        return;
                    }
                }
            }
            if buf.len() > MAX_EVENT_BYTES {
                failure = Some("an event longer than 1 MiB".into());
                break;
            }
        }
        self.guard.record(&self.ticket);
        if !saw_usage && done {
            self.ticket.set_usage(self.worst.0, self.worst.1);
        }
        if let Some(attempt) = self.attempt.take() {
            let outcome = match (done, first, last) {
                (true, Some(f), Some(l)) => serrano_router::Outcome::Ok {
                    ttft_ms: f.duration_since(self.sent).as_secs_f64() * 1e3,
                    itl_ms: (chunks > 1)
                        .then(|| l.duration_since(f).as_secs_f64() * 1e3 / f64::from(chunks - 1)),
                },
                (true, _, _) => serrano_router::Outcome::Ok {
                    ttft_ms: self.sent.elapsed().as_secs_f64() * 1e3,
                    itl_ms: None,
                },
                _ if violation.is_some() => serrano_router::Outcome::Refused,
                _ => serrano_router::Outcome::Failed,
            };
            let latency = first.map(|f| f.duration_since(self.sent));
            self.routing.metrics.finish(attempt, outcome, latency);
        }
        let up = &self.up;
        let (status, error) = match (done, failure) {
            _ if violation.is_some() => (400, violation.clone()),
            (true, _) => (200, None),
            (false, Some(e)) => (502, Some(format!("backend '{}': {e}", up.name))),
            (false, None) => (
                502,
                Some(format!("backend '{}' ended the stream early", up.name)),
            ),
        };
        if let Some(v) = &violation {
            let e = ApiError {
                code: Some("content_policy_violation".into()),
                ..ApiError::invalid(v.clone())
            };
            self.send(crate::openai::error_json(&e)).await;
        } else if status != 200 {
            tracing::warn!(backend = %up.name, "stream failed: {error:?}");
            self.send(crate::openai::error_json(&upstream_error(
                up,
                "stream failed",
            )))
            .await;
        }
        // The record is written before the last chunk, so a client that saw [DONE] is audited.
        match self.ticket.finish(status, error).await {
            Ok(f) if status == 200 => {
                self.routing.metrics.spent(&self.up.name, f.cost_nusd);
                self.send("[DONE]".into()).await;
            }
            Ok(_) => {}
            Err(e) => {
                self.send(crate::openai::error_json(&ApiError::from(e)))
                    .await;
            }
        }
    }
}

/// Counts a streamed chunk; `true` if it carried the upstream's usage.
fn record_stream_chunk(ticket: &Ticket, v: &Value) -> bool {
    for c in v["choices"].as_array().into_iter().flatten() {
        let i = c["index"].as_u64().unwrap_or(0) as usize;
        let text = c["delta"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap_or("");
        if !text.is_empty() {
            ticket.token(i, text);
        }
        if let Some(r) = c["finish_reason"].as_str() {
            ticket.set_finish_reason(r);
        }
    }
    record_usage(ticket, &v["usage"])
}

/// (end of the event's text, end including its blank line) of the first complete SSE event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_bounds_cover_everything_sent() {
        let chat = serde_json::json!({"messages": [{"role": "user", "content": "hello"}]});
        let with_tools = serde_json::json!({"messages": [{"role": "user", "content": "hello"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "x".repeat(1000)}}}]});
        assert!(prompt_bound(&chat) >= 5 + 4);
        assert!(prompt_bound(&with_tools) > 1000);
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some((7, 9)));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some((7, 11)));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }
}
