//! Talking to the endpoint under test: model discovery, prompts of exact token counts (through
//! the server's own tokenizer), and one request with its timeline.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::metrics::RequestRecord;
use crate::workload::{Endpoint, Workload};
use crate::BenchError;

/// Longest one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Text the synthetic prompts are cut from: plain prose, so that any tokenizer splits it into
/// ordinary tokens, long enough that prompts rarely share a prefix.
const CORPUS: &str = include_str!("corpus.txt");

/// An OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct Target {
    /// Base URL including `/v1`.
    pub base: String,
    pub key: Option<String>,
    /// Another server's root to tokenize at (the same model), for a target without the
    /// routes, such as a gateway in front of servers that have them.
    tokenizer: Option<String>,
    client: reqwest::Client,
}

impl Target {
    pub fn new(base: &str, key: Option<String>) -> Result<Target, BenchError> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::MAX)
            // Below the keep-alive timeouts of common servers (llama.cpp's HTTP library closes
            // idle connections after 5 s): reusing one the server has closed fails the request.
            .pool_idle_timeout(Duration::from_secs(2))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        Ok(Target {
            base: base.trim_end_matches('/').to_string(),
            key,
            tokenizer: None,
            client,
        })
    }

    /// Tokenize at `url` (a base URL, with or without `/v1`) instead of the target.
    pub fn tokenize_at(mut self, url: &str) -> Target {
        let url = url.trim_end_matches('/');
        self.tokenizer = Some(url.strip_suffix("/v1").unwrap_or(url).to_string());
        self
    }

    /// The root of the server that tokenizes (tokenize routes live beside `/v1`, not under
    /// it): the target's, unless [`Target::tokenize_at`] named another.
    fn root(&self) -> &str {
        match &self.tokenizer {
            Some(t) => t,
            None => self.base.strip_suffix("/v1").unwrap_or(&self.base),
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match key.or(self.key.as_deref()) {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn post_json(&self, url: String, body: &Value) -> Result<Value, String> {
        let resp = self
            .request(reqwest::Method::POST, url, None)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {v}"));
        }
        Ok(v)
    }

    /// The first model the server lists.
    pub async fn first_model(&self) -> Result<String, BenchError> {
        let v: Value = self
            .request(reqwest::Method::GET, format!("{}/models", self.base), None)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| BenchError::Setup(format!("GET {}/models: {e}", self.base)))?
            .json()
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        v["data"][0]["id"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| BenchError::Setup(format!("{}/models lists no model", self.base)))
    }

    /// The corpus in the server's tokens, whole or, where the server refuses that much text at
    /// once (a small context), in pieces of a few words. `None` when it has no tokenizer route.
    pub async fn tokenize_corpus(&self, model: &str) -> Option<Vec<u32>> {
        if let Some(t) = self.tokenize(model, CORPUS).await {
            return Some(t);
        }
        let words: Vec<&str> = CORPUS.split_whitespace().collect();
        let mut out = Vec::new();
        for (i, chunk) in words.chunks(16).enumerate() {
            // Later pieces start with the space that separates them from the last one.
            let text = if i == 0 {
                chunk.join(" ")
            } else {
                format!(" {}", chunk.join(" "))
            };
            out.extend(self.tokenize(model, &text).await?);
        }
        (out.len() > 16).then_some(out)
    }

    /// vLLM's and serrano's `/tokenize` shape, else llama.cpp's.
    async fn tokenize(&self, model: &str, text: &str) -> Option<Vec<u32>> {
        let url = format!("{}/tokenize", self.root());
        let shapes = [
            json!({"model": model, "prompt": text, "add_special_tokens": false}),
            json!({"content": text, "add_special": false}),
        ];
        for body in shapes {
            if let Ok(v) = self.post_json(url.clone(), &body).await {
                let tokens: Option<Vec<u32>> = v["tokens"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_u64().map(|t| t as u32))
                        .collect()
                });
                if let Some(t) = tokens.filter(|t| !t.is_empty()) {
                    return Some(t);
                }
            }
        }
        None
    }

    /// Token ids back to text (vLLM/serrano shape, else llama.cpp's).
    pub async fn detokenize(&self, model: &str, tokens: &[u32]) -> Result<String, String> {
        let url = format!("{}/detokenize", self.root());
        let v = match self
            .post_json(url.clone(), &json!({"model": model, "tokens": tokens}))
            .await
        {
            Ok(v) => v,
            Err(_) => self.post_json(url, &json!({"tokens": tokens})).await?,
        };
        v["prompt"]
            .as_str()
            .or(v["content"].as_str())
            .map(String::from)
            .ok_or_else(|| format!("no text in {v}"))
    }
}

/// What one request sends.
#[derive(Debug, Clone)]
pub enum Prompt {
    Tokens(Vec<u32>),
    Text(String),
}

/// Prompts of exact token counts, cut from the tokenized corpus at varying offsets (so that
/// requests do not share a prefix by accident), after an optional shared prefix.
pub struct PromptMaker {
    tokens: Vec<u32>,
    /// True when the server tokenized the corpus (counts are exact), false for the fallback
    /// (whitespace words, about one token each).
    pub exact: bool,
}

impl PromptMaker {
    pub async fn new(target: &Target, model: &str) -> PromptMaker {
        match target.tokenize_corpus(model).await {
            Some(tokens) => PromptMaker {
                tokens,
                exact: true,
            },
            None => PromptMaker {
                tokens: (0..CORPUS.split_whitespace().count() as u32).collect(),
                exact: false,
            },
        }
    }

    /// `n` token ids: the first `shared` from the corpus start, the rest from `offset`.
    pub fn ids(&self, n: u64, shared: u64, offset: usize) -> Vec<u32> {
        let len = self.tokens.len();
        let shared = shared.min(n) as usize;
        let head = (0..shared).map(|i| self.tokens[i % len]);
        let tail = (0..n as usize - shared).map(|i| self.tokens[(offset + i) % len]);
        head.chain(tail).collect()
    }

    /// Text for the fallback: the same positions as words of the corpus.
    pub fn words(&self, ids: &[u32]) -> String {
        let words: Vec<&str> = CORPUS.split_whitespace().collect();
        ids.iter()
            .map(|&i| words[i as usize % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn corpus_len(&self) -> usize {
        self.tokens.len()
    }
}

/// One request to send.
pub struct Call<'a> {
    pub model: &'a str,
    /// The tenant's key, else the target's.
    pub key: Option<&'a str>,
    pub prompt: &'a Prompt,
    pub max_tokens: u64,
    /// Earlier turns of the conversation: (user message, the server's reply).
    pub history: &'a [(String, String)],
    /// Collect the reply's text (for the conversation's next turn).
    pub keep_reply: bool,
}

/// Sends one request and records its timeline; times are seconds since `t0`. Returns the
/// reply's text too when `call.keep_reply` (else an empty string).
pub async fn send(
    target: &Target,
    w: &Workload,
    call: Call<'_>,
    intended: f64,
    t0: Instant,
) -> (RequestRecord, String) {
    let Call {
        model,
        key,
        prompt,
        max_tokens,
        history,
        keep_reply,
    } = call;
    let mut reply = String::new();
    let since = |t: Instant| t.duration_since(t0).as_secs_f64();
    let mut body = match (w.endpoint, prompt) {
        (Endpoint::Completions, Prompt::Tokens(ids)) => json!({"model": model, "prompt": ids}),
        (Endpoint::Completions, Prompt::Text(t)) => json!({"model": model, "prompt": t}),
        (Endpoint::Chat, Prompt::Text(t)) => {
            let mut messages: Vec<Value> = history
                .iter()
                .flat_map(|(user, assistant)| {
                    [
                        json!({"role": "user", "content": user}),
                        json!({"role": "assistant", "content": assistant}),
                    ]
                })
                .collect();
            messages.push(json!({"role": "user", "content": t}));
            json!({"model": model, "messages": messages})
        }
        (Endpoint::Chat, Prompt::Tokens(_)) => unreachable!("chat prompts are text"),
    };
    body["max_tokens"] = json!(max_tokens);
    body["temperature"] = json!(0);
    body["stream"] = json!(w.stream);
    if w.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if w.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    let planned_prompt = match prompt {
        Prompt::Tokens(ids) => ids.len() as u64,
        Prompt::Text(_) => 0,
    };
    let path = match w.endpoint {
        Endpoint::Chat => "/chat/completions",
        Endpoint::Completions => "/completions",
    };
    let sent = Instant::now();
    let mut rec = RequestRecord {
        intended,
        sent: since(sent),
        prompt_tokens: planned_prompt,
        ..Default::default()
    };
    let post = || {
        target
            .request(reqwest::Method::POST, format!("{}{path}", target.base), key)
            .json(&body)
            .send()
    };
    let mut resp = post().await;
    // A kept-alive connection the server closed just as this request went out (llama.cpp's
    // HTTP library closes them after a few requests): the server never saw the request, so
    // it is sent once more, as browsers do. The time lost stays in TTFT.
    if let Err(e) = &resp {
        if is_stale_connection(e) {
            rec.retried = true;
            resp = post().await;
        }
    }
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            rec.end = since(Instant::now());
            rec.error = Some(chain(&e));
            return (rec, reply);
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        rec.end = since(Instant::now());
        rec.error = Some(format!(
            "HTTP {}: {}",
            status.as_u16(),
            text.chars().take(300).collect::<String>()
        ));
        return (rec, reply);
    }
    if !w.stream {
        let v: Result<Value, _> = resp.json().await;
        rec.end = since(Instant::now());
        match v {
            Ok(v) => {
                rec.chunks.push(rec.end);
                usage(&mut rec, &v["usage"]);
                if keep_reply {
                    let c = &v["choices"][0];
                    reply = c["message"]["content"]
                        .as_str()
                        .or(c["text"].as_str())
                        .unwrap_or_default()
                        .to_string();
                }
            }
            Err(e) => rec.error = Some(e.to_string()),
        }
        return (rec, reply);
    }
    // SSE framing (LF or CRLF, multi-line data) is eventsource-stream's.
    let mut events = resp.bytes_stream().eventsource();
    let mut done = false;
    let mut saw_usage = false;
    let mut content_chunks = 0u64;
    while let Some(event) = events.next().await {
        let now = since(Instant::now());
        let data = match event {
            Ok(e) => e.data,
            Err(e) => {
                rec.error = Some(e.to_string());
                break;
            }
        };
        if data.trim() == "[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        if v["error"].is_object() {
            rec.error = Some(format!("stream error: {}", v["error"]));
            break;
        }
        let mut has_text = false;
        for t in v["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                c["delta"]["content"]
                    .as_str()
                    .or(c["text"].as_str())
                    .filter(|t| !t.is_empty())
            })
        {
            has_text = true;
            if keep_reply {
                reply.push_str(t);
            }
        }
        if has_text {
            rec.chunks.push(now);
            content_chunks += 1;
        }
        saw_usage |= usage(&mut rec, &v["usage"]);
    }
    rec.end = since(Instant::now());
    if !done && rec.error.is_none() {
        rec.error = Some("the stream ended without [DONE]".into());
    }
    if !saw_usage {
        // Without usage, one content chunk is one token (true for serrano, vLLM, llama.cpp).
        rec.output_tokens = content_chunks;
    }
    (rec, reply)
}

fn is_stale_connection(e: &reqwest::Error) -> bool {
    let text = chain(e);
    e.is_request()
        && (text.contains("connection closed before message completed")
            || text.contains("Connection reset by peer")
            || text.contains("Broken pipe"))
}

/// An error with its causes ("error sending request: connection closed before message completed").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// Takes the server's token counts; `true` if it reported them.
fn usage(rec: &mut RequestRecord, u: &Value) -> bool {
    match (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()) {
        (Some(p), Some(c)) => {
            rec.prompt_tokens = p;
            rec.output_tokens = c;
            true
        }
        _ => false,
    }
}
