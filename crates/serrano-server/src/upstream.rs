//! An OpenAI-compatible upstream (another serrano, llama.cpp's llama-server, vLLM, a hosted API)
//! as a backend: the request goes out as the client sent it, with a guaranteed `max_tokens` so
//! the reservation bounds what it generates, and its answer (a JSON body or SSE chunks) comes
//! back as backend events, usage included (streams always ask for it).

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::Value;
use serrano_api as api;

use crate::backend::{
    AttemptCtx, Backend, BackendError, Delta, Event, EventStream, Generation, Logprobs, Prepared,
    Request,
};
use crate::error::ApiError;

/// Longest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest `max_tokens` forwarded when the upstream did not report the model's context.
const MAX_FORWARDED_MAX_TOKENS: u64 = 1 << 20;
/// Largest upstream response body read whole.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Longest a forwarded `/tokenize` may take (less if the backend's own timeout is shorter).
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Fields some servers read in place of `max_tokens`, which the reservation would not bound.
const UNBOUNDED_FIELDS: &[&str] = &["n_predict", "max_new_tokens"];

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
    /// Whole-request limit; `None`: the request's own deadline.
    timeout: Option<Duration>,
    key: Option<String>,
    client: reqwest::Client,
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

    fn authorized(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// Remembers the context lengths a model listing reported.
    fn learn_contexts(&self, models: &[(String, Option<u64>)]) {
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

    /// The upstream's model ids and, where reported (vLLM, serrano), context lengths.
    pub async fn discover_models(&self) -> Result<Vec<(String, Option<u64>)>, String> {
        let r = self.authorized(self.client.get(format!("{}/models", self.base)));
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

    fn error(&self, detail: impl std::fmt::Display) -> ApiError {
        tracing::warn!(backend = %self.name, "upstream failed: {detail}");
        ApiError {
            code: Some("upstream_error".into()),
            ..ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                format!("The backend '{}' failed to answer", self.name),
            )
        }
    }

    /// An upstream's refusal: client errors (4xx) pass through with the upstream's message;
    /// anything else is 502. 429 and 5xx may go to another backend.
    async fn refusal(&self, resp: reqwest::Response) -> BackendError {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = body["error"]["message"].as_str().unwrap_or("").to_string();
        let passed = StatusCode::from_u16(status.as_u16()).ok().filter(|s| {
            s.is_client_error() && *s != StatusCode::UNAUTHORIZED && *s != StatusCode::FORBIDDEN
        });
        let error = match passed {
            Some(s) => ApiError::new(
                s,
                "invalid_request_error",
                format!("The backend '{}' refused the request: {msg}", self.name),
            ),
            None => self.error(format!("status {status}: {msg}")),
        };
        match status.as_u16() {
            429 => BackendError::busy(error),
            s if s >= 500 => BackendError::failed(error),
            _ => BackendError::refused(error),
        }
    }

    /// The body to send: the request as the client sent it, for this backend's model id, with
    /// `n` and a `max_tokens` the reservation covers.
    fn body(&self, gen: &Generation, model: &str) -> Result<(Value, u64, u64), ApiError> {
        let extra = gen.request.extra();
        if let Some(f) = UNBOUNDED_FIELDS.iter().find(|f| extra.contains_key(**f)) {
            return Err(ApiError::invalid_param(
                f,
                format!("'{f}' would let the backend generate past the budget reservation; use max_tokens"),
            ));
        }
        if let Some(b) = extra.get("best_of").filter(|b| !b.is_null()) {
            if b.as_u64() != Some(gen.n as u64) && b.as_u64() != Some(1) {
                return Err(ApiError::invalid_param(
                    "best_of",
                    "best_of other than 1 or n would generate choices the reservation does not cover",
                ));
            }
        }
        let mut body = match &gen.request {
            Request::Chat(r) => serde_json::to_value(r),
            Request::Completion(r) => serde_json::to_value(r),
        }
        .map_err(ApiError::internal)?;
        body["model"] = Value::from(model);
        body["n"] = Value::from(gen.n);
        if gen.stream {
            // Usage is asked for always; the relay sends it on only when the client asked.
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        // A byte-level BPE token covers at least one byte, and every byte that can reach the
        // prompt (messages, tool schemas, template text standing for JSON punctuation) is in
        // the body, so its length bounds the prompt's tokens without the upstream's tokenizer.
        let bound = serde_json::to_string(&body).map_or(u64::MAX, |s| s.len() as u64);
        // The context any candidate of this model is known to have bounds what may be asked.
        let ceiling = self
            .context_length(model)
            .unwrap_or(MAX_FORWARDED_MAX_TOKENS);
        let max_tokens = match gen.max_tokens {
            Some(m) if (1..=ceiling).contains(&m) => m,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!("max_tokens must be an integer from 1 to {ceiling}"),
                ))
            }
            None => self
                .default_max_tokens
                .min(ceiling - bound.min(ceiling - 1)),
        };
        // Both spellings carry the reserved bound, whichever one the upstream reads.
        body["max_tokens"] = Value::from(max_tokens);
        if gen.request.is_chat() {
            body["max_completion_tokens"] = Value::from(max_tokens);
        }
        Ok((body, bound, max_tokens))
    }
}

#[async_trait::async_trait]
impl Backend for Upstream {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "openai"
    }

    fn context_length(&self, model: &str) -> Option<u64> {
        let learned = self
            .learned_context
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied();
        learned.or(self.context_length)
    }

    fn exact_tally(&self) -> bool {
        // A chunk may hold several tokens, or none.
        false
    }

    async fn prepare(&self, gen: &Generation, model: &str) -> Result<Prepared, BackendError> {
        let (body, bound, max_tokens) = self.body(gen, model).map_err(BackendError::refused)?;
        Ok(Prepared::new(bound, max_tokens, body))
    }

    async fn generate(
        &self,
        gen: &Generation,
        work: Prepared,
        ctx: &AttemptCtx,
    ) -> Result<EventStream, BackendError> {
        let body: Value = work.into_work()?;
        let path = if gen.request.is_chat() {
            "/chat/completions"
        } else {
            "/completions"
        };
        let left = ctx
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        // The attempt's trace context, so the upstream's spans join the request's trace.
        let mut trace = axum::http::HeaderMap::new();
        crate::trace::inject(&mut trace);
        let resp = self
            .authorized(self.client.post(format!("{}{path}", self.base)))
            .headers(trace)
            .json(&body)
            .timeout(self.timeout.map_or(left, |t| t.min(left)))
            .send()
            .await
            .map_err(|e| BackendError::failed(self.error(e)))?;
        if !resp.status().is_success() {
            return Err(self.refusal(resp).await);
        }
        let chat = gen.request.is_chat();
        let failed = self.error("the response broke off or could not be read");
        if gen.stream {
            return Ok(sse_events(resp, chat, failed));
        }
        // Accepted: a body that breaks off from here on is the request's outcome, charged.
        Ok(futures::stream::once(async move {
            let bytes = match read_capped(resp, MAX_RESPONSE_BYTES).await {
                Ok(bytes) => bytes,
                // The answer to what the client asked for (its n, its max_tokens) outgrew the
                // limit: the request's doing, so it does not count against the backend.
                Err(BodyError::TooLarge(cap)) => {
                    return vec![Event::Error(BackendError::refused(ApiError {
                        code: Some("response_too_large".into()),
                        ..ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "server_error",
                            format!("The backend's answer is larger than {cap} bytes; ask for fewer or shorter choices"),
                        )
                    }))]
                }
                Err(e) => {
                    tracing::warn!("upstream response broke off: {e}");
                    return vec![Event::Error(BackendError::failed(failed))];
                }
            };
            response_events(&bytes, chat).unwrap_or_else(|e| {
                tracing::warn!("upstream response unreadable: {e}");
                vec![Event::Error(BackendError::failed(failed))]
            })
        })
        .flat_map(futures::stream::iter)
        .boxed())
    }

    /// vLLM's `/tokenize` at the server's root (beside `/v1`), as serrano and vLLM serve it; a
    /// server without it answers 404, passed on.
    async fn tokenize(
        &self,
        req: &api::TokenizeRequest,
    ) -> Option<Result<api::TokenizeResponse, BackendError>> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let sent = self
            .authorized(self.client.post(format!("{root}/tokenize")))
            .json(req)
            .timeout(
                self.timeout
                    .unwrap_or(TOKENIZE_TIMEOUT)
                    .min(TOKENIZE_TIMEOUT),
            )
            .send()
            .await;
        let resp = match sent {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Some(Err(self.refusal(r).await)),
            Err(e) => return Some(Err(BackendError::failed(self.error(e)))),
        };
        let parsed = match read_capped(resp, MAX_RESPONSE_BYTES).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        Some(parsed.map_err(|e| BackendError::failed(self.error(e))))
    }

    async fn health(&self) -> Option<Result<(), String>> {
        Some(self.discover_models().await.map(|models| {
            self.learn_contexts(&models);
        }))
    }
}

/// A response body, refused past `cap` bytes.
async fn read_capped(resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge(cap));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The events of a whole (non-streamed) response.
fn response_events(bytes: &[u8], chat: bool) -> Result<Vec<Event>, serde_json::Error> {
    let mut out = Vec::new();
    if chat {
        let r: api::ChatCompletion = serde_json::from_slice(bytes)?;
        meta(&mut out, r.system_fingerprint, r.extra);
        for c in r.choices {
            let m = c.message;
            out.push(Event::Delta(Delta {
                index: c.index,
                generated: true,
                text: m.content.unwrap_or_default(),
                logprobs: c.logprobs.map(|l| Logprobs::Chat(l.content)),
                extra: m.extra,
            }));
            for (k, t) in m.tool_calls.into_iter().flatten().enumerate() {
                out.push(Event::ToolCall {
                    index: c.index,
                    call: api::ToolCallDelta {
                        index: k as u32,
                        id: Some(t.id),
                        kind: Some(t.kind),
                        function: Some(api::FunctionCallDelta {
                            name: Some(t.function.name),
                            arguments: Some(t.function.arguments),
                        }),
                    },
                    legacy: false,
                });
            }
            if let Some(f) = m.function_call {
                out.push(legacy_call(
                    c.index,
                    api::FunctionCallDelta {
                        name: Some(f.name),
                        arguments: Some(f.arguments),
                    },
                ));
            }
            finish(&mut out, c.index, c.finish_reason, c.extra);
        }
        usage(&mut out, r.usage);
    } else {
        let r: api::Completion = serde_json::from_slice(bytes)?;
        completion_events(&mut out, r);
    }
    Ok(out)
}

fn legacy_call(index: u32, f: api::FunctionCallDelta) -> Event {
    Event::ToolCall {
        index,
        call: api::ToolCallDelta {
            function: Some(f),
            ..Default::default()
        },
        legacy: true,
    }
}

fn meta(out: &mut Vec<Event>, fingerprint: Option<String>, mut extra: api::Extra) {
    if let Some(f) = fingerprint {
        extra.insert("system_fingerprint".into(), Value::from(f));
    }
    if !extra.is_empty() {
        out.push(Event::Meta(extra));
    }
}

fn finish(out: &mut Vec<Event>, index: u32, reason: Option<String>, extra: api::Extra) {
    if let Some(reason) = reason {
        out.push(Event::Finish {
            index,
            reason,
            extra,
        });
    }
}

fn usage(out: &mut Vec<Event>, u: Option<api::Usage>) {
    if let Some(u) = u {
        out.push(Event::Usage {
            prompt_tokens: u.prompt_tokens.into(),
            completion_tokens: u.completion_tokens.into(),
        });
    }
}

/// A legacy completion (whole, or one streamed chunk).
fn completion_events(out: &mut Vec<Event>, r: api::Completion) {
    meta(out, r.system_fingerprint, r.extra);
    for c in r.choices {
        if !c.text.is_empty() || c.logprobs.is_some() {
            out.push(Event::Delta(Delta {
                index: c.index,
                generated: !c.text.is_empty(),
                text: c.text,
                logprobs: c.logprobs.map(Logprobs::Completion),
                extra: Default::default(),
            }));
        }
        finish(out, c.index, c.finish_reason, c.extra);
    }
    usage(out, r.usage);
}

/// One streamed chat chunk.
fn chunk_events(out: &mut Vec<Event>, r: api::ChatCompletionChunk) {
    meta(out, r.system_fingerprint, r.extra);
    for c in r.choices {
        let d = c.delta;
        let text = d.content.unwrap_or_default();
        if !text.is_empty() || c.logprobs.is_some() || !d.extra.is_empty() {
            out.push(Event::Delta(Delta {
                index: c.index,
                generated: !text.is_empty(),
                text,
                logprobs: c.logprobs.map(|l| Logprobs::Chat(l.content)),
                extra: d.extra,
            }));
        }
        for call in d.tool_calls.into_iter().flatten() {
            out.push(Event::ToolCall {
                index: c.index,
                call,
                legacy: false,
            });
        }
        if let Some(f) = d.function_call {
            out.push(legacy_call(c.index, f));
        }
        finish(out, c.index, c.finish_reason, c.extra);
    }
    usage(out, r.usage.flatten());
}

/// The events of an SSE stream; it must end with `[DONE]`, else it broke off.
fn sse_events(resp: reqwest::Response, chat: bool, failed: ApiError) -> EventStream {
    let frames = bounded_events(resp.bytes_stream(), MAX_EVENT_BYTES)
        .eventsource()
        .boxed();
    let early = ApiError {
        message: format!("{} (the stream ended early)", failed.message),
        ..failed.clone()
    };
    futures::stream::unfold(Some(frames), move |frames| {
        let (failed, early) = (failed.clone(), early.clone());
        async move {
            let mut frames = frames?;
            loop {
                let data = match frames.next().await {
                    Some(Ok(f)) => f.data,
                    Some(Err(e)) => {
                        tracing::warn!("upstream stream failed: {e}");
                        return Some((vec![Event::Error(BackendError::failed(failed))], None));
                    }
                    None => return Some((vec![Event::Error(BackendError::failed(early))], None)),
                };
                if data.trim() == "[DONE]" {
                    return None;
                }
                let mut out = Vec::new();
                // A chunk that does not parse is skipped, as OpenAI's clients do.
                if chat {
                    if let Ok(c) = serde_json::from_str::<api::ChatCompletionChunk>(&data) {
                        chunk_events(&mut out, c);
                    }
                } else if let Ok(c) = serde_json::from_str::<api::Completion>(&data) {
                    completion_events(&mut out, c);
                }
                if !out.is_empty() {
                    return Some((out, Some(frames)));
                }
            }
        }
    })
    .flat_map(futures::stream::iter)
    .boxed()
}

/// Why a response body stopped.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    #[error("an event longer than {0} bytes")]
    EventTooLong(usize),
    #[error("a body larger than {0} bytes")]
    TooLarge(usize),
}

/// The body's bytes, failing once an SSE event runs past `max` bytes without its blank line:
/// the SSE parser keeps an event whole until it ends, so an endless one would grow unbounded.
fn bounded_events<S>(body: S, max: usize) -> impl Stream<Item = Result<bytes::Bytes, BodyError>>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>>,
{
    let (mut pending, mut tail) = (0usize, Vec::<u8>::new());
    body.map(move |chunk| {
        let chunk = chunk?;
        // The last 3 bytes of the previous chunk, so a boundary split across chunks is seen.
        let mut joined = std::mem::take(&mut tail);
        joined.extend_from_slice(&chunk);
        pending = match last_event_end(&joined) {
            Some(end) => joined.len() - end,
            None => pending + chunk.len(),
        };
        tail = joined[joined.len().saturating_sub(3)..].to_vec();
        if pending > max {
            return Err(BodyError::EventTooLong(max));
        }
        Ok(chunk)
    })
}

/// Where the last complete SSE event of `buf` ends (just past its blank line).
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf
        .windows(4)
        .rposition(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    lf.max(crlf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ends_are_found_in_either_framing() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"data: a\n"), None);
    }

    #[tokio::test]
    async fn an_endless_event_is_cut_off_and_a_split_boundary_is_not() {
        let chunks = |parts: &[&'static [u8]]| {
            futures::stream::iter(
                parts
                    .iter()
                    .map(|p| Ok::<_, reqwest::Error>(bytes::Bytes::from_static(p)))
                    .collect::<Vec<_>>(),
            )
        };
        // Each event is 6 bytes, the limit 8, and the blank line falls across chunks.
        let ok: Vec<_> = bounded_events(chunks(&[b"data:a\n", b"\ndata:b\n", b"\n"]), 8)
            .collect()
            .await;
        assert!(ok.iter().all(Result::is_ok));
        let long: Vec<_> = bounded_events(chunks(&[b"data:aaaa", b"aaaa"]), 8)
            .collect()
            .await;
        assert!(matches!(long.last(), Some(Err(BodyError::EventTooLong(8)))));
    }

    #[test]
    fn a_whole_chat_response_becomes_events_with_its_extras() {
        let body = br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"service_tier":"flex"}"#;
        let events = response_events(body, true).unwrap();
        assert!(matches!(&events[0], Event::Meta(m) if m["service_tier"] == "flex"));
        assert!(
            matches!(&events[1], Event::Delta(d) if d.text == "hi" && d.extra.contains_key("refusal"))
        );
        assert!(
            matches!(&events[2], Event::ToolCall { call, .. } if call.function.as_ref().unwrap().name.as_deref() == Some("f"))
        );
        assert!(matches!(&events[3], Event::Finish { reason, .. } if reason == "tool_calls"));
        assert!(matches!(
            events[4],
            Event::Usage {
                prompt_tokens: 3,
                completion_tokens: 2
            }
        ));
    }
}
