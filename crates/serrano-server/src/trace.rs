//! Request traces: one span per authenticated request, named and attributed after
//! OpenTelemetry's HTTP and GenAI semantic conventions plus serrano's own `serrano.*`, with child
//! spans for the steps of the pipeline; and the W3C trace context (`traceparent`) taken from the
//! client and passed on to upstreams.
//!
//! Every span here is TRACE-level under [`TARGET`]: only the trace exporter's layer enables
//! that target (the binary's `telemetry`), so without one these are disabled spans and
//! recording on them costs a branch. The request span lives on the request's `Ticket`, which
//! records the audited outcome on it and ends it when the record is written.

use std::time::{Instant, SystemTime};

use axum::http::HeaderMap;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The one target of serrano's trace spans.
pub const TARGET: &str = serrano_gov::TRACE_TARGET;

/// The span of one authenticated request, a child of the client's `traceparent` if it sent
/// one. Fields left empty are recorded as the request learns them.
pub fn request_span(method: &str, path: &str, headers: &HeaderMap) -> Span {
    let span = ticket_span(None, &format!("{method} {path}"), "server");
    span.record("http.request.method", method);
    span.record("url.path", path);
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        // Fails only when no exporter layer is installed, and then nothing is exported.
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of a ticket made for part of a request (a step of server-side tool use, one of its
/// tool calls), a child of the request's span, with the same fields: the part's own audited
/// outcome is recorded on it.
pub fn sub_request(parent: &Span, name: &str) -> Span {
    ticket_span(Some(parent), name, "internal")
}

fn ticket_span(parent: Option<&Span>, name: &str, kind: &'static str) -> Span {
    tracing::trace_span!(
        target: TARGET,
        parent: parent.and_then(Span::id),
        "request",
        otel.name = %name,
        otel.kind = kind,
        otel.status_code = Empty,
        http.request.method = Empty,
        url.path = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.request.top_p = Empty,
        gen_ai.request.seed = Empty,
        gen_ai.response.id = Empty,
        gen_ai.response.model = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        serrano.tenant = Empty,
        serrano.key_prefix = Empty,
        serrano.backend = Empty,
        serrano.route.reason = Empty,
        serrano.region = Empty,
        serrano.config_version = Empty,
        serrano.slo_class = Empty,
        serrano.budget.reserved_tokens = Empty,
        serrano.cost_usd = Empty,
        serrano.filters = Empty,
        serrano.audit.seq = Empty,
    )
}

/// The gate's work on an authenticated request (authentication from `from`, then its scope)
/// as a child of the request's span, which starts only once the key checked out.
pub fn gate(parent: &Span, from: Instant) {
    use opentelemetry::trace::Span as _;
    if parent.is_disabled() {
        return;
    }
    let wall = Wall::now();
    let mut span = explicit(parent, "gate", wall.at(from), vec![]);
    span.end_with_timestamp(wall.at(Instant::now()));
}

/// One MCP `tools/call` to a server (kind client, after OpenTelemetry's MCP conventions), a
/// child of `parent`; its context goes to the server in the request's `_meta` (see
/// [`mcp_meta`]).
pub fn mcp_call(parent: &Span, server: &str, tool: &str) -> Span {
    tracing::trace_span!(
        target: TARGET,
        parent: parent,
        "mcp",
        otel.name = %format!("tools/call {tool}"),
        otel.kind = "client",
        otel.status_code = Empty,
        error.type = Empty,
        mcp.method.name = "tools/call",
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = %tool,
        serrano.mcp.server = %server,
    )
}

/// The W3C trace context of `span` as an MCP request's `_meta` (`traceparent`, `tracestate`:
/// SEP-414), so an MCP server's own spans join the trace, over stdio as over HTTP; `None` when
/// traces are off.
pub fn mcp_meta(span: &Span) -> Option<rmcp::model::RequestMetaObject> {
    if span.is_disabled() {
        return None;
    }
    let mut fields = std::collections::HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    let mut meta = rmcp::model::RequestMetaObject::default();
    meta.set_traceparent(fields.remove("traceparent")?);
    if let Some(state) = fields.remove("tracestate").filter(|s| !s.is_empty()) {
        meta.set_tracestate(state);
    }
    Some(meta)
}

/// Turns the process's `Instant`s into wall-clock times, for spans measured elsewhere.
struct Wall {
    now: Instant,
    wall: SystemTime,
}

impl Wall {
    fn now() -> Wall {
        Wall {
            now: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    fn at(&self, i: Instant) -> SystemTime {
        self.wall - self.now.saturating_duration_since(i)
    }
}

/// A span of `parent` that started at `from` (ended by the caller with its own time): built
/// with the OpenTelemetry API, which takes explicit times, where `tracing`'s spans do not.
fn explicit(
    parent: &Span,
    name: &'static str,
    from: SystemTime,
    attributes: Vec<opentelemetry::KeyValue>,
) -> opentelemetry::global::BoxedSpan {
    use opentelemetry::trace::Tracer as _;
    let tracer = opentelemetry::global::tracer("serrano");
    tracer
        .span_builder(name)
        .with_start_time(from)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent.context())
}

/// A step of the pipeline (`filters`, `plan`, `reserve`, `finish`), a child of `parent`.
pub fn step(parent: &Span, name: &'static str) -> Span {
    tracing::trace_span!(target: TARGET, parent: parent, "step", otel.name = name)
}

/// One attempt at a backend: a GenAI client span (`chat MODEL`), a child of `parent`.
pub fn attempt(parent: &Span, operation: &str, model: &str, backend: &str) -> Span {
    tracing::trace_span!(
        target: TARGET,
        parent: parent,
        "attempt",
        otel.name = %format!("{operation} {model}"),
        otel.kind = "client",
        otel.status_code = Empty,
        error.type = Empty,
        gen_ai.operation.name = %operation,
        gen_ai.request.model = %model,
        serrano.backend = %backend,
    )
}

/// Most token events one choice's decode span carries; later tokens are counted in
/// `serrano.token_events_dropped` (a 4,096-token answer is 4,096 events, about 600 KB of OTLP).
pub const MAX_TOKEN_EVENTS: usize = 4096;

/// The steps of one choice's tokens, as many as a trace keeps.
#[derive(Debug, Clone, Default)]
pub struct TokenSteps {
    steps: Vec<serrano_engine::TokenStep>,
    dropped: usize,
}

impl TokenSteps {
    pub fn push(&mut self, step: serrano_engine::TokenStep) {
        if self.steps.len() < MAX_TOKEN_EVENTS {
            self.steps.push(step);
        } else {
            self.dropped += 1;
        }
    }
}

/// A finished engine sequence's phases as children of `parent` (the attempt span): `queue`
/// (submitted until its first step), `prefill` (until its first token; `serrano.prefill_steps`
/// chunks) and `decode` (until its last token; with `tokens`, an event `serrano.token` per token
/// at the time it was sampled, naming its step and what the step held). They are measured on
/// the engine's clock, so they are built with the OpenTelemetry API, which takes explicit times,
/// not as `tracing` spans.
pub fn engine_phases(
    parent: &Span,
    choice: usize,
    t: &serrano_engine::Timing,
    tokens: usize,
    steps: Option<TokenSteps>,
) {
    use opentelemetry::trace::Span as _;
    use opentelemetry::KeyValue;
    if parent.is_disabled() {
        return;
    }
    let clock = Wall::now();
    let wall = |i: Instant| clock.at(i);
    let choice = KeyValue::new("serrano.choice", choice as i64);
    let phase = |name: &'static str,
                 from: Instant,
                 to: Instant,
                 extra: Vec<KeyValue>,
                 steps: Option<TokenSteps>| {
        let mut attributes = vec![choice.clone()];
        attributes.extend(extra);
        let mut span = explicit(parent, name, wall(from), attributes);
        if let Some(steps) = steps {
            let mut last = from;
            for (n, s) in steps.steps.iter().enumerate() {
                let gap = s.at.saturating_duration_since(last).as_secs_f64() * 1e3;
                last = s.at;
                let attributes = vec![
                    KeyValue::new("serrano.token.index", n as i64),
                    KeyValue::new("serrano.token.gap_ms", gap),
                    KeyValue::new("serrano.step", s.index as i64),
                    KeyValue::new(
                        "serrano.step.ms",
                        s.at.saturating_duration_since(s.started).as_secs_f64() * 1e3,
                    ),
                    KeyValue::new("serrano.step.seqs", i64::from(s.seqs)),
                    KeyValue::new("serrano.step.decode_seqs", i64::from(s.decode_seqs)),
                    KeyValue::new("serrano.step.prefill_tokens", i64::from(s.prefill_tokens)),
                ];
                span.add_event_with_timestamp("serrano.token", wall(s.at), attributes);
            }
            if steps.dropped > 0 {
                let dropped = KeyValue::new("serrano.token_events_dropped", steps.dropped as i64);
                span.set_attribute(dropped);
            }
        }
        span.end_with_timestamp(wall(to));
    };
    let scheduled = t.scheduled.unwrap_or(t.finished);
    let first = t.first_token.unwrap_or(t.finished);
    phase("queue", t.arrival, scheduled, vec![], None);
    let prefill_steps = KeyValue::new("serrano.prefill_steps", i64::from(t.prefill_steps));
    phase("prefill", scheduled, first, vec![prefill_steps], None);
    let tokens = KeyValue::new("gen_ai.usage.output_tokens", tokens as i64);
    phase("decode", first, t.finished, vec![tokens], steps);
}

/// The W3C trace context of the current span, for a request to an upstream (nothing when
/// traces are off).
pub fn inject(headers: &mut HeaderMap) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}
