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
    let span = tracing::trace_span!(
        target: TARGET,
        "request",
        otel.name = %format!("{method} {path}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        url.path = %path,
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
    );
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        // Fails only when no exporter layer is installed, and then nothing is exported.
        let _ = span.set_parent(parent);
    }
    span
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

/// A finished engine sequence's phases as children of `parent` (the attempt span): `queue`
/// (submitted until its first step), `prefill` (until its first token; `serrano.prefill_steps`
/// chunks) and `decode` (until its last token). They are measured on the engine's clock, so they
/// are built with the OpenTelemetry API, which takes explicit times, not as `tracing` spans.
pub fn engine_phases(parent: &Span, choice: usize, t: &serrano_engine::Timing, tokens: usize) {
    use opentelemetry::trace::{Span as _, Tracer as _};
    use opentelemetry::KeyValue;
    if parent.is_disabled() {
        return;
    }
    let cx = parent.context();
    let tracer = opentelemetry::global::tracer("serrano");
    // The engine's instants as wall-clock times.
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let wall = |i: Instant| wall_now - now.saturating_duration_since(i);
    let choice = KeyValue::new("serrano.choice", choice as i64);
    let phase = |name: &'static str, from: Instant, to: Instant, extra: Option<KeyValue>| {
        let mut attributes = vec![choice.clone()];
        attributes.extend(extra);
        let mut span = tracer
            .span_builder(name)
            .with_start_time(wall(from))
            .with_attributes(attributes)
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(wall(to));
    };
    let scheduled = t.scheduled.unwrap_or(t.finished);
    let first = t.first_token.unwrap_or(t.finished);
    phase("queue", t.arrival, scheduled, None);
    let steps = KeyValue::new("serrano.prefill_steps", i64::from(t.prefill_steps));
    phase("prefill", scheduled, first, Some(steps));
    let tokens = KeyValue::new("gen_ai.usage.output_tokens", tokens as i64);
    phase("decode", first, t.finished, Some(tokens));
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
