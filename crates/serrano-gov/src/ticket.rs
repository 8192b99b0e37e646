//! A request's governance ticket: who made it, what it reserved, what it used, and its audit
//! record. Exactly one record is written per ticket: by `finish`, or, if the request is dropped
//! first (client gone, handler cancelled), by the ticket's destructor.
//!
//! What a settlement charges follows one rule ([`Reservation`]): nothing until a backend has
//! accepted the request; after that, the usage the backend reported, else its own tally when
//! that tally is exact (the in-process engine counts every token), else the whole reservation.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::audit::{AuditRecord, Retention, MAX_FIELD_BYTES, MAX_TOOL_CALLS, MAX_VERDICTS};
use crate::error::GovError;
use crate::keys::Principal;
use crate::rate::RateInfo;
use crate::storage::{Content, FinishOp, Finished, ReserveOp, Settlement};
use crate::store::Governance;
use crate::time::now_ms;

/// The `tracing` target of request trace spans: only the trace exporter's layer enables it.
pub const TRACE_TARGET: &str = "serrano::trace";

/// Status recorded when the client went away before the response completed (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;
/// The backend name of the in-process engine.
pub const LOCAL_BACKEND: &str = "local";

#[derive(Clone)]
pub struct Ticket(Arc<Inner>);

struct Inner {
    gov: Governance,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    record: AuditRecord,
    principal: Option<Principal>,
    charge: Charge,
    rate: Option<RateInfo>,
    first_token: Option<Instant>,
    prompt_text: Option<String>,
    completions: Vec<String>,
    fallbacks: Vec<String>,
    /// The backend and route reason last set, kept for response headers after the record left.
    route: Option<(String, String)>,
    /// Tool names and verdicts left out of the record, past its counts (noted in it).
    more_tools: usize,
    more_verdicts: usize,
    claimed: bool,
    done: bool,
    /// The request's trace span (disabled unless traces are exported): `finish` records the
    /// audited outcome on it and ends it.
    span: Option<tracing::Span>,
}

/// Where the request's reservation stands; it decides what the settlement charges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Charge {
    /// Nothing reserved: nothing to settle.
    #[default]
    None,
    /// Reserved, and no backend has accepted the request: settles as void.
    Reserved { prompt: u64, completion: u64 },
    /// A backend accepted it: its outcome is charged.
    Accepted {
        prompt: u64,
        completion: u64,
        /// Every counted token is one generated token (the tally may stand in for usage).
        tally_exact: bool,
        /// The backend reported its usage (`set_usage` was called after acceptance).
        reported: bool,
    },
}

/// A request's budget reservation (its worst case, held in the ledger until the ticket
/// settles). It voids itself unless [`accept`](Reservation::accept) says a backend took the
/// request: a request refused before any backend ran, or whose every attempt failed before
/// being accepted, is charged nothing. Once accepted, the outcome is charged even when the
/// request later fails: the usage the backend reports, else the tally when it is exact, else
/// the whole reservation (the backend may have done all the work).
#[must_use = "a reservation nobody accepts settles as void"]
pub struct Reservation(Ticket);

impl Reservation {
    /// A backend accepted the request; `tally_exact` when each counted token is one generated.
    pub fn accept(&self, tally_exact: bool) {
        let mut s = self.0.state();
        if let Charge::Reserved { prompt, completion } = s.charge {
            s.charge = Charge::Accepted {
                prompt,
                completion,
                tally_exact,
                reported: false,
            };
        }
    }

    /// The usage the backend reported (prompt counted once, completions of every choice).
    pub fn set_usage(&self, prompt_tokens: u64, completion_tokens: u64) {
        let mut s = self.0.state();
        s.record.prompt_tokens = prompt_tokens;
        s.record.completion_tokens = completion_tokens;
        if let Charge::Accepted { reported, .. } = &mut s.charge {
            *reported = true;
        }
    }

    /// The worst case reserved: (prompt tokens, completion tokens).
    pub fn worst_case(&self) -> (u64, u64) {
        match self.0.state().charge {
            Charge::Reserved { prompt, completion }
            | Charge::Accepted {
                prompt, completion, ..
            } => (prompt, completion),
            Charge::None => (0, 0),
        }
    }
}

impl Ticket {
    pub fn new(gov: &Governance, request_id: String, method: &str, endpoint: &str) -> Ticket {
        let record = AuditRecord {
            request_id,
            method: method.to_string(),
            endpoint: endpoint.to_string(),
            region: gov.config().region.clone(),
            ..Default::default()
        };
        Ticket(Arc::new(Inner {
            gov: gov.clone(),
            started: Instant::now(),
            state: Mutex::new(State {
                record,
                ..Default::default()
            }),
        }))
    }

    /// A ticket for one part of this request (a step of a server-side tool loop, one tool call
    /// it makes), for the same principal, with its own record and reservation: its request id
    /// is this one's followed by `.suffix`, so the parts of a request sort together.
    pub fn child(&self, suffix: &str) -> Ticket {
        let (id, method, endpoint, principal) = {
            let s = self.state();
            let r = &s.record;
            let id = format!("{}.{suffix}", r.request_id);
            (
                id,
                r.method.clone(),
                r.endpoint.clone(),
                s.principal.clone(),
            )
        };
        let child = Ticket::new(&self.0.gov, id, &method, &endpoint);
        if let Some(p) = principal {
            child.set_principal(p);
        }
        child
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock left plain data; keep using it.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_principal(&self, p: Principal) {
        let mut s = self.state();
        s.record.tenant = Some(p.tenant.clone());
        s.record.key = Some(p.key_prefix.clone());
        s.principal = Some(p);
    }

    /// The backend and route that served the request, once chosen.
    pub fn route(&self) -> Option<(String, String)> {
        self.state().route.clone()
    }

    pub fn principal(&self) -> Option<Principal> {
        self.state().principal.clone()
    }

    /// Whether prompts and completions are kept (so the caller knows to pass them).
    pub fn keeps_content(&self) -> bool {
        self.state()
            .principal
            .as_ref()
            .is_some_and(|p| p.retention != Retention::None)
    }

    /// The model the request names (its backend and route are set once it is routed).
    pub fn set_model(&self, model: &str) {
        self.state().record.model = Some(model.to_string());
    }

    /// A safety-filter verdict (never the matched text). Past [`MAX_VERDICTS`] only counted.
    pub fn add_verdict(&self, verdict: serde_json::Value) {
        let mut s = self.state();
        if s.record.filters.len() < MAX_VERDICTS {
            s.record.filters.push(verdict);
        } else {
            s.more_verdicts += 1;
        }
    }

    /// Tool names a response called. Past [`MAX_TOOL_CALLS`] only counted.
    /// A tool call a response made: its name, and the sha256 of its arguments.
    pub fn add_tool_call(&self, name: &str, arguments: &str) {
        use sha2::Digest;
        let mut s = self.state();
        if s.record.tool_calls.len() >= MAX_TOOL_CALLS {
            s.more_tools += 1;
            return;
        }
        s.record.tool_calls.push(name.to_string());
        let digest = sha2::Sha256::digest(arguments.as_bytes());
        let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
        s.record.tool_args_sha256.push(hex);
    }

    pub fn add_tool_calls(&self, names: &[&str]) {
        let mut s = self.state();
        let room = MAX_TOOL_CALLS.saturating_sub(s.record.tool_calls.len());
        let kept = names.len().min(room);
        s.record
            .tool_calls
            .extend(names[..kept].iter().map(|n| n.to_string()));
        s.more_tools += names.len() - kept;
    }

    /// The routing decision: the backend that serves the request (after any fallback), its
    /// region, why it was chosen, and the config version that decided.
    pub fn set_route(&self, backend: &str, region: &str, reason: &str, config_version: u64) {
        let mut s = self.state();
        s.record.backend = Some(backend.to_string());
        s.record.region = Some(region.to_string());
        s.record.route = Some(reason.to_string());
        s.record.config_version = Some(config_version);
        s.route = Some((backend.to_string(), reason.to_string()));
    }

    /// The config version that routed (or failed to route) the request.
    pub fn set_config_version(&self, version: u64) {
        self.state().record.config_version = Some(version);
    }

    /// Backends the request may fall back to; its worst case is priced at the dearest of them.
    pub fn set_fallbacks(&self, backends: Vec<String>) {
        self.state().fallbacks = backends;
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.0.started.elapsed()
    }

    pub fn set_prompt_text(&self, text: String) {
        self.state().prompt_text = Some(text);
    }

    /// Reserves the worst case (`prompt_tokens + max_completion_tokens`, priced) against every
    /// budget of the principal's tenant and key. Call after `set_principal`, `set_model` and
    /// `set_route`. The reservation is void unless a backend accepts the request.
    pub async fn reserve(
        &self,
        prompt_tokens: u64,
        max_completion_tokens: u64,
    ) -> Result<Reservation, GovError> {
        self.reserve_op(prompt_tokens, max_completion_tokens, false)
            .await
    }

    /// Reserves a tool call: one request of one prompt token (priced at the model's input
    /// price) that the tenant's and key's tool-call limits also count.
    pub async fn reserve_tool_call(&self) -> Result<Reservation, GovError> {
        self.reserve_op(1, 0, true).await
    }

    async fn reserve_op(
        &self,
        prompt_tokens: u64,
        max_completion_tokens: u64,
        tool_call: bool,
    ) -> Result<Reservation, GovError> {
        let op = {
            let mut s = self.state();
            s.record.prompt_tokens = prompt_tokens;
            let p = s
                .principal
                .as_ref()
                .ok_or_else(|| GovError::Unauthorized("no principal".into()))?;
            let ttl = self.0.gov.config().reservation_ttl;
            ReserveOp {
                request_id: s.record.request_id.clone(),
                tenant_id: p.tenant_id,
                key_id: p.key_id,
                model: s.record.model.clone().unwrap_or_default(),
                backend: s.record.backend.clone().unwrap_or_default(),
                fallbacks: s.fallbacks.clone(),
                prompt_tokens,
                max_completion_tokens,
                expires_ms: now_ms().saturating_add(ttl.as_millis() as i64),
                tool_call,
            }
        };
        // Run in a task of its own holding the ticket: if the request is cancelled while the
        // writer commits, the task still marks the reservation, so the ticket's destructor
        // (which runs once the task lets go) settles it instead of leaking it until expiry.
        let t = self.clone();
        let task = tokio::spawn(async move {
            let rate = t.0.gov.reserve(op).await?;
            let mut s = t.state();
            s.charge = Charge::Reserved {
                prompt: prompt_tokens,
                completion: max_completion_tokens,
            };
            s.rate = rate;
            Ok::<(), GovError>(())
        });
        task.await
            .map_err(|e| GovError::Unavailable(format!("the reservation task failed: {e}")))??;
        Ok(Reservation(self.clone()))
    }

    /// The rate-limit state after this request's reservation, for `x-ratelimit-*` headers.
    pub fn rate_info(&self) -> Option<RateInfo> {
        self.state().rate
    }

    /// One generated token of choice `index`, with its text if content is kept.
    pub fn token(&self, index: usize, text: &str) {
        let mut s = self.state();
        s.record.completion_tokens += 1;
        if s.first_token.is_none() {
            s.first_token = Some(Instant::now());
        }
        push_text(&mut s, index, text);
    }

    /// Completion text of choice `index` without counting a token (text a filter held back).
    pub fn append_text(&self, index: usize, text: &str) {
        push_text(&mut self.state(), index, text);
    }

    pub fn set_finish_reason(&self, reason: &str) {
        let mut s = self.state();
        let r = &mut s.record.finish_reason;
        // With several choices, keep them all: "stop,length" (until the record's bound, which
        // `AuditRecord::bound` cuts to, so that an upstream's reasons cannot grow it).
        match r {
            Some(prev) if prev.len() > MAX_FIELD_BYTES => {}
            Some(prev) if !prev.split(',').any(|x| x == reason) => {
                prev.push(',');
                prev.push_str(reason);
            }
            Some(_) => {}
            None => *r = Some(reason.to_string()),
        }
    }

    /// Gives the ticket the request's trace span. The span must declare the fields `finish`
    /// records (see [`record_outcome`]).
    pub fn set_span(&self, span: tracing::Span) {
        self.state().span = Some(span);
    }

    /// The request's trace span (a disabled one if it has none, or has finished).
    pub fn span(&self) -> tracing::Span {
        self.state()
            .span
            .clone()
            .unwrap_or_else(tracing::Span::none)
    }

    /// The caller takes over the ticket: it will `finish` it itself (the inference pipeline,
    /// whose streams write their record before their last event), so whoever returns the
    /// response must not. Called once, where the hand-over happens.
    pub fn claim(&self) {
        self.state().claimed = true;
    }

    pub fn is_claimed(&self) -> bool {
        self.state().claimed
    }

    /// Settles the reservation with the usage so far and appends the audit record; returns once
    /// both are durable. A second call is a no-op.
    pub async fn finish(&self, status: u16, error: Option<String>) -> Result<Finished, GovError> {
        let Some(op) = self.take(status, error) else {
            return Ok(Finished {
                seq: 0,
                cost_nusd: 0,
            });
        };
        let span = self.state().span.take();
        if let Some(span) = &span {
            record_outcome(span, &op.record);
        }
        // The audit write as a step of the request's trace.
        let writing = match &span {
            Some(s) => {
                tracing::trace_span!(target: TRACE_TARGET, parent: s, "step", otel.name = "finish")
            }
            None => tracing::Span::none(),
        };
        // A task of its own, so a cancelled caller cannot drop the record while it waits for
        // room in the writer's queue.
        let gov = self.0.gov.clone();
        let finished = tokio::spawn(async move { gov.finish(op).await })
            .instrument(writing)
            .await
            .map_err(|e| GovError::Unavailable(format!("the audit task failed: {e}")))?;
        if let (Some(span), Ok(f)) = (&span, &finished) {
            span.record("serrano.audit.seq", f.seq);
            span.record("serrano.cost_usd", f.cost_nusd as f64 / 1e9);
        }
        // Dropping the last handle ends the span: a request's span lasts until its record.
        finished
    }

    fn take(&self, status: u16, error: Option<String>) -> Option<FinishOp> {
        let mut s = self.state();
        if s.done {
            return None;
        }
        s.done = true;
        Some(build(&mut s, self.0.started, status, error))
    }
}

/// Records a request's audited outcome on its trace span, under OpenTelemetry's GenAI and HTTP
/// attribute names and serrano's own (`serrano.*`); the span declares these fields.
fn record_outcome(span: &tracing::Span, r: &AuditRecord) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", r.status);
    span.record("gen_ai.response.id", r.request_id.as_str());
    span.record("gen_ai.usage.input_tokens", r.prompt_tokens);
    span.record("gen_ai.usage.output_tokens", r.completion_tokens);
    if let Some(v) = &r.model {
        span.record("gen_ai.response.model", v.as_str());
    }
    if let Some(v) = &r.finish_reason {
        span.record("gen_ai.response.finish_reasons", v.as_str());
    }
    if let Some(v) = &r.tenant {
        span.record("serrano.tenant", v.as_str());
    }
    if let Some(v) = &r.key {
        span.record("serrano.key_prefix", v.as_str());
    }
    if let Some(v) = &r.backend {
        span.record("serrano.backend", v.as_str());
    }
    if let Some(v) = &r.route {
        span.record("serrano.route.reason", v.as_str());
    }
    if let Some(v) = &r.region {
        span.record("serrano.region", v.as_str());
    }
    if let Some(v) = r.config_version {
        span.record("serrano.config_version", v);
    }
    if !r.filters.is_empty() {
        let verdicts = serde_json::to_string(&r.filters).unwrap_or_default();
        span.record("serrano.filters", verdicts.as_str());
    }
    if r.status >= 400 {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", r.status.to_string().as_str());
    }
}

/// Most choices a request may have; indexes past it (from a misbehaving upstream) are ignored.
const MAX_CHOICES: usize = 16;

fn push_text(s: &mut State, index: usize, text: &str) {
    if s.prompt_text.is_some() && !text.is_empty() && index < MAX_CHOICES {
        if s.completions.len() <= index {
            s.completions.resize(index + 1, String::new());
        }
        s.completions[index].push_str(text);
    }
}

fn build(s: &mut State, started: Instant, status: u16, error: Option<String>) -> FinishOp {
    let mut record = std::mem::take(&mut s.record);
    record.status = status;
    record.error = error;
    record.latency_ms = ms(started.elapsed());
    record.ttft_ms = s.first_token.map(|t| ms(t - started));
    let (prompt_tokens, completion_tokens) = match s.charge {
        Charge::None => (record.prompt_tokens, record.completion_tokens),
        Charge::Reserved { .. } => (0, 0),
        Charge::Accepted { reported: true, .. }
        | Charge::Accepted {
            tally_exact: true, ..
        } => (record.prompt_tokens, record.completion_tokens),
        Charge::Accepted {
            prompt, completion, ..
        } => (prompt, completion),
    };
    // The record states what was charged.
    record.prompt_tokens = prompt_tokens;
    record.completion_tokens = completion_tokens;
    let settlement = match (&s.principal, s.charge != Charge::None) {
        (Some(p), true) => Some(Settlement {
            request_id: record.request_id.clone(),
            tenant_id: p.tenant_id,
            key_id: p.key_id,
            tenant: p.tenant.clone(),
            key_prefix: p.key_prefix.clone(),
            model: record.model.clone().unwrap_or_default(),
            backend: record.backend.clone().unwrap_or_default(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
        }),
        _ => None,
    };
    // Only the record's copies are bounded: the ledger prices and groups by the exact model
    // and backend, which come from the deployment (a request naming an unknown model is refused
    // before `set_model`), never from the client.
    record.bound(s.more_tools, s.more_verdicts);
    let content = match (&s.principal, s.prompt_text.take()) {
        (Some(p), Some(prompt)) if p.retention != Retention::None => Some(Content {
            tenant_id: p.tenant_id,
            retention: p.retention,
            prompt,
            completion: serde_json::to_string(&s.completions).unwrap_or_default(),
        }),
        _ => None,
    };
    FinishOp {
        settlement,
        record,
        content,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Drop for Inner {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if s.done {
            return;
        }
        s.done = true;
        let op = build(
            s,
            self.started,
            CLIENT_CLOSED,
            Some("the client closed the connection before the response completed".into()),
        );
        let gov = self.gov.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = gov.finish(op).await {
                        tracing::error!("cannot audit an abandoned request: {e}");
                    }
                });
            }
            Err(_) => tracing::error!(
                request_id = %op.record.request_id,
                "request dropped outside the runtime: its reservation will expire unaudited"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{MAX_VERDICTS, MAX_VERDICT_BYTES};
    use crate::config::GovConfig;
    use crate::keys::Role;

    /// The most a record's JSON may take, whatever a client sends: ten string fields of
    /// `MAX_FIELD_BYTES` and their notes (~3 KB), 33 tool names (~9.5 KB), 33 verdicts of at
    /// most `MAX_VERDICT_BYTES` (~16.5 KB), a request id and the numbers; ~29 KB in all. (The
    /// huge inputs below come to ~21 KB: their cut verdicts are shorter than the bound.)
    const MAX_RECORD_BYTES: usize = 32 * 1024;

    async fn gov(dir: &tempfile::TempDir) -> Governance {
        let mut config = GovConfig::new(dir.path().join("g.db"));
        config.region = Some("r".repeat(100_000));
        Governance::open(config).await.unwrap()
    }

    /// A ticket given `huge` wherever a client, an upstream or an operator puts text.
    fn filled(gov: &Governance, huge: &str) -> Ticket {
        let t = Ticket::new(gov, "req-1".into(), huge, &format!("/v1/{huge}"));
        t.set_principal(Principal {
            tenant_id: 1,
            tenant: "t".into(),
            key_id: 0,
            key_prefix: format!("jwt:{huge}"),
            role: Role::Inference,
            models: None,
            grant_interactive: false,
            retention: Retention::None,
            filter: None,
        });
        t.set_model(huge);
        t.set_route(huge, huge, huge, 1);
        for i in 0..1_000 {
            t.set_finish_reason(&format!("{i}{huge}"));
            t.add_tool_calls(&[huge, huge, huge]);
            t.add_verdict(serde_json::json!({ "stage": huge, "n": i }));
        }
        t
    }

    fn record_of(t: &Ticket, huge: &str) -> (FinishOp, String) {
        let op = t.take(500, Some(format!("error: {huge}"))).unwrap();
        let text = serde_json::to_string(&op.record).unwrap();
        (op, text)
    }

    #[tokio::test]
    async fn a_record_from_huge_inputs_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let gov = gov(&dir).await;
        // Plain text, multi-byte text (cut at a character boundary), and text JSON escapes to
        // six bytes a character.
        for huge in [
            "x".repeat(4 << 20),
            "é".repeat(30_000),
            "\u{1}".repeat(60_000),
        ] {
            let t = filled(&gov, &huge);
            let (op, text) = record_of(&t, &huge);
            assert!(text.len() < MAX_RECORD_BYTES, "{} bytes", text.len());
            let r = &op.record;
            assert!(r.endpoint.starts_with("/v1/"), "{}", r.endpoint);
            assert!(
                r.endpoint
                    .ends_with(&format!("… ({} bytes)", huge.len() + 4)),
                "{}",
                r.endpoint
            );
            for field in [&r.model, &r.backend, &r.key, &r.route, &r.error, &r.region] {
                let f = field.as_deref().unwrap();
                assert!(f.len() < MAX_FIELD_BYTES + 32, "{} bytes", f.len());
                assert!(f.ends_with(" bytes)"), "{f}");
            }
            assert_eq!(r.tool_calls.len(), MAX_TOOL_CALLS + 1);
            assert_eq!(
                r.tool_calls.last().unwrap(),
                &format!("… ({} more)", 3_000 - MAX_TOOL_CALLS)
            );
            assert_eq!(r.filters.len(), MAX_VERDICTS + 1);
            assert_eq!(
                r.filters.last().unwrap(),
                &serde_json::json!({ "dropped": 1_000 - MAX_VERDICTS })
            );
            assert!(r.filters[0]["truncated"].is_string());
            // The record still parses as one.
            serde_json::from_str::<AuditRecord>(&text).unwrap();
            drop(t);
        }
    }

    #[tokio::test]
    async fn ordinary_records_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let gov = Governance::open(GovConfig::new(dir.path().join("g.db")))
            .await
            .unwrap();
        let t = Ticket::new(&gov, "req-2".into(), "POST", "/v1/chat/completions");
        t.set_model("llama-3.1-8b-instruct");
        t.set_route("local", "eu", "cheapest", 3);
        t.set_finish_reason("stop");
        t.set_finish_reason("length");
        t.add_tool_calls(&["get_weather", "lookup"]);
        let verdict = serde_json::json!({ "stage": "prompt", "action": "redact",
                                          "kinds": { "pii.email": 2 } });
        assert!(verdict.to_string().len() < MAX_VERDICT_BYTES);
        t.add_verdict(verdict.clone());
        let (op, _) = record_of(&t, "oops");
        let r = op.record;
        assert_eq!(r.endpoint, "/v1/chat/completions");
        assert_eq!(r.model.as_deref(), Some("llama-3.1-8b-instruct"));
        assert_eq!(r.finish_reason.as_deref(), Some("stop,length"));
        assert_eq!(r.tool_calls, ["get_weather", "lookup"]);
        assert_eq!(r.filters, [verdict]);
        assert_eq!(r.error.as_deref(), Some("error: oops"));
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_by_its_json_width() {
        let mut s = "ab".to_string();
        crate::audit::bound_text(&mut s, 2);
        assert_eq!(s, "ab");
        let mut s = "abc".to_string();
        crate::audit::bound_text(&mut s, 2);
        assert_eq!(s, "ab… (3 bytes)");
        let mut s = "aé".to_string();
        crate::audit::bound_text(&mut s, 2);
        assert_eq!(s, "a… (3 bytes)");
        let mut s = "\"\"x".to_string();
        crate::audit::bound_text(&mut s, 4);
        assert_eq!(s, "\"\"… (3 bytes)");
    }
}
