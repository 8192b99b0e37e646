//! The one request pipeline, for every backend: validate once → the tenant's filters → plan →
//! each candidate's cheap checks → reserve → per candidate: an attempt, `generate`, falling back
//! on retryable errors before anything reached the client → one relay → one `finish`.
//!
//! The pipeline owns the request's ticket from its first step (`Ticket::claim`): it writes the
//! audit record itself, before a stream's last event, whatever the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serrano_api as api;
use serrano_gov::{GovError, Principal, Role, Ticket};
use serrano_router::{Candidate, Plan};
use tracing::Instrument;

use crate::backend::{AttemptCtx, BackendError, EventStream, Fault, Generation, Prepared, Request};
use crate::error::ApiError;
use crate::gov::principal;
use crate::relay::{self, Relay};
use crate::routing::Handle;
use crate::safety::{self, OutputGuard};
use crate::state::AppState;
use crate::trace;

/// Header with an integer priority; higher is admitted first. Admin keys only: a tenant must not
/// raise itself above others.
pub const PRIORITY_HEADER: &str = "x-serrano-priority";

/// Header with the request's latency class, `interactive` or `batch` (see `slo_class`).
pub const SLO_CLASS_HEADER: &str = "x-serrano-slo-class";
/// Header asking for an event per token in the request's trace (see `token_events`).
pub const TRACE_TOKENS_HEADER: &str = "x-serrano-trace-tokens";

/// Runs a chat or legacy completion through the pipeline; the answer, or the error, is audited.
pub async fn serve(
    st: &Arc<AppState>,
    ticket: Ticket,
    headers: &HeaderMap,
    request: Request,
) -> Response {
    ticket.claim();
    // One deadline for the whole request: every attempt, and the relay, end by it.
    let deadline = tokio::time::Instant::now() + st.config.request_timeout;
    match start(st, &ticket, headers, request, deadline).await {
        Ok((relay, gen, events)) => relay::respond(relay, &gen, events).await,
        Err(e) => refuse(&ticket, e).await,
    }
}

/// Answers `e` once it is on the ticket's record.
pub async fn refuse(ticket: &Ticket, e: ApiError) -> Response {
    match ticket
        .finish(e.status.as_u16(), Some(e.message.clone()))
        .await
    {
        Ok(_) => e.into_response(),
        // No audit, no response: the client gets 503, never an unrecorded answer.
        Err(g) => ApiError::from(g).into_response(),
    }
}

/// Runs one chat request through the pipeline and reads its answer whole (a step of the
/// server-side tool loop); the step's record is written on `ticket` whatever the outcome.
pub async fn step(
    st: &Arc<AppState>,
    ticket: &Ticket,
    headers: &HeaderMap,
    request: api::ChatCompletionRequest,
    deadline: tokio::time::Instant,
) -> Result<api::ChatCompletion, ApiError> {
    ticket.claim();
    match start(st, ticket, headers, Request::Chat(request), deadline).await {
        Ok((relay, gen, events)) => relay::chat_answer(relay, &gen, events).await,
        Err(e) => {
            ticket
                .finish(e.status.as_u16(), Some(e.message.clone()))
                .await?;
            Err(e)
        }
    }
}

/// Everything up to a backend's acceptance: the relay to read its events with.
async fn start(
    st: &Arc<AppState>,
    ticket: &Ticket,
    headers: &HeaderMap,
    request: Request,
    deadline: tokio::time::Instant,
) -> Result<(Relay, Generation, EventStream), ApiError> {
    let p = principal(ticket)?;
    let priority = priority(headers, &p)?;
    let span = ticket.span();
    let (model, plan) = trace::step(&span, "plan")
        .in_scope(|| scoped_plan(st, ticket, &p, requested_model(&request)))?;
    let mut gen = Generation::new(request, model, p.tenant.clone(), priority)?;
    gen.class = slo_class(headers, &p, &plan)?;
    gen.token_events = token_events(headers, &p, &plan)?;
    record_request(&span, &gen);
    // One notion of latency targets: the numbers `cheapest-within-slo` routed by are the ones
    // a local engine schedules by.
    let ms =
        |v: Option<f64>| v.and_then(|ms| std::time::Duration::try_from_secs_f64(ms / 1000.0).ok());
    gen.ttft_target = ms(plan.slo.ttft_p95_ms);
    gen.itl_target = ms(plan.slo.itl_p95_ms);
    gen.request = safety::filter_off_workers(&p, ticket, gen.request)
        .instrument(trace::step(&span, "filters"))
        .await?;
    let guard = output_guard(&p, &gen)?;
    if ticket.keeps_content() {
        ticket.set_prompt_text(prompt_text(&gen.request));
    }
    let (candidates, mut tried, first_error) = prepare_all(&gen, &plan).await;
    let Some(first) = candidates.first() else {
        return Err(first_error.unwrap_or_else(|| no_backend(&tried)));
    };
    let worst_prompt = candidates
        .iter()
        .map(|(_, w)| w.prompt_tokens)
        .max()
        .unwrap_or(0);
    let worst_completion = candidates
        .iter()
        .map(|(_, w)| w.max_tokens)
        .max()
        .unwrap_or(0);
    set_route(ticket, &plan, &first.0, &tried);
    ticket.set_fallbacks(
        candidates
            .iter()
            .skip(1)
            .map(|(c, _)| c.name.clone())
            .collect(),
    );
    let reserved = worst_completion.saturating_mul(gen.choices as u64);
    let reservation = ticket
        .reserve(worst_prompt, reserved)
        .instrument(trace::step(&span, "reserve"))
        .await?;
    span.record(
        "serrano.budget.reserved_tokens",
        worst_prompt.saturating_add(reserved),
    );
    let ctx = AttemptCtx { deadline };
    let metrics = &st.routing.metrics;
    let backoff = Duration::from_millis(plan.config.routing.backoff_ms);
    let mut waited = Duration::ZERO;
    let mut last_error = first_error;
    for (i, (cand, work)) in candidates.into_iter().enumerate() {
        if i > 0 {
            // Exponential backoff with jitter, so retries of many requests do not align.
            let d =
                backoff.mul_f64(f64::from(1u32 << (i - 1).min(10)) * rand::random_range(0.5..1.5));
            tokio::time::sleep(d).await;
            waited += d;
        }
        if tokio::time::Instant::now() >= deadline {
            last_error = Some(ApiError::timeout(st.config.request_timeout));
            break;
        }
        let Some(attempt) = cand.state.begin(Instant::now()) else {
            tried.push(format!("{} unavailable", cand.name));
            continue;
        };
        set_route(ticket, &plan, &cand, &tried);
        let sent = Instant::now();
        let attempt_span = trace::attempt(&span, operation(&gen), &gen.model, &cand.name);
        let generated = cand
            .handle
            .generate(&gen, work, &ctx)
            .instrument(attempt_span.clone())
            .await;
        if let Err(e) = &generated {
            attempt_span.record("otel.status_code", "ERROR");
            attempt_span.record("error.type", fault_word(e.fault));
        }
        match generated {
            Ok(events) => {
                reservation.accept(cand.handle.exact_tally());
                // Time in the gateway since the request arrived, less failed attempts and backoff.
                metrics.gateway_overhead(ticket.elapsed().saturating_sub(waited));
                let relay = Relay {
                    ticket: ticket.clone(),
                    reservation,
                    guard,
                    attempt,
                    routing: st.routing.clone(),
                    backend: cand.name.clone(),
                    sent,
                    deadline,
                    limit: st.config.request_timeout,
                };
                return Ok((relay, gen, events));
            }
            Err(e) => {
                metrics.finish(attempt, e.fault.outcome(), None);
                waited += sent.elapsed();
                if !e.retryable() {
                    return Err(e.error);
                }
                tried.push(format!("{} {}", cand.name, fault_word(e.fault)));
                last_error = Some(e.error);
            }
        }
    }
    drop(reservation);
    Err(last_error.unwrap_or_else(|| no_backend(&tried)))
}

/// The request's GenAI operation name.
fn operation(gen: &Generation) -> &'static str {
    if gen.request.is_chat() {
        "chat"
    } else {
        "text_completion"
    }
}

/// What the request asked for, on its trace span (GenAI request attributes).
fn record_request(span: &tracing::Span, gen: &Generation) {
    if span.is_disabled() {
        return;
    }
    span.record("gen_ai.operation.name", operation(gen));
    span.record("gen_ai.request.model", gen.model.as_str());
    if let Some(n) = gen.max_tokens {
        span.record("gen_ai.request.max_tokens", n);
    }
    span.record(
        "gen_ai.request.temperature",
        f64::from(gen.sampling.temperature),
    );
    span.record("gen_ai.request.top_p", f64::from(gen.sampling.top_p));
    if let Some(seed) = gen.sampling.seed {
        span.record("gen_ai.request.seed", seed);
    }
    span.record("serrano.slo_class", gen.class.as_str());
}

fn fault_word(fault: Fault) -> &'static str {
    match fault {
        Fault::Backend => "failed",
        Fault::Busy => "busy",
        Fault::Request => "refused",
    }
}

fn no_backend(tried: &[String]) -> ApiError {
    ApiError {
        code: Some("no_backend_available".into()),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("no backend could take the request: {}", tried.join(", ")),
        )
    }
}

/// Renders the request for every candidate of the plan; a candidate that cannot serve it is
/// left out (so the next may), and when none can, the first one's reason is the answer.
async fn prepare_all(
    gen: &Generation,
    plan: &Plan<Handle>,
) -> (
    Vec<(Candidate<Handle>, Prepared)>,
    Vec<String>,
    Option<ApiError>,
) {
    let mut ready = Vec::new();
    let mut tried = Vec::new();
    let mut first_error = None;
    for c in &plan.candidates {
        match c.handle.prepare(gen, &c.model).await {
            Ok(w) => ready.push((c.clone(), w)),
            Err(BackendError { error, fault }) => {
                tried.push(format!("{} {}", c.name, fault_word(fault)));
                first_error.get_or_insert(error);
            }
        }
    }
    (ready, tried, first_error)
}

/// Records which backend serves the request now, and why.
fn set_route(ticket: &Ticket, plan: &Plan<Handle>, cand: &Candidate<Handle>, tried: &[String]) {
    let mut reason = plan.reason.clone();
    if !tried.is_empty() {
        reason = format!(
            "{reason}; fell back to {} after {}",
            cand.name,
            tried.join(", ")
        );
    }
    let region = &plan.config.backends[cand.index].region;
    ticket.set_route(&cand.name, region, &reason, plan.version);
}

fn requested_model(request: &Request) -> Option<&str> {
    match request {
        Request::Chat(r) => r.model.as_deref(),
        Request::Completion(r) => r.model.as_deref(),
    }
    .filter(|m| !m.is_empty())
}

/// The priority of the request in the engine's queue (admin keys only).
fn priority(headers: &HeaderMap, p: &Principal) -> Result<i32, ApiError> {
    match headers.get(PRIORITY_HEADER) {
        None => Ok(0),
        Some(_) if p.role != Role::Admin => Err(GovError::Forbidden(format!(
            "{PRIORITY_HEADER} may only be sent with an admin key"
        ))
        .into()),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| (-100..=100).contains(p))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "{PRIORITY_HEADER} must be an integer from -100 to 100"
                ))
            }),
    }
}

/// Whether a traced request gets an event per token: the `x-serrano-trace-tokens` header's
/// answer (`true` or `false`; any key may ask, the events are in its own trace), else the
/// tenant's `trace_tokens`.
fn token_events(headers: &HeaderMap, p: &Principal, plan: &Plan<Handle>) -> Result<bool, ApiError> {
    match headers
        .get(TRACE_TOKENS_HEADER)
        .map(|v| v.to_str().unwrap_or(""))
    {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(ApiError::invalid(format!(
            "{TRACE_TOKENS_HEADER} must be 'true' or 'false'"
        ))),
        None => Ok(plan
            .config
            .tenants
            .get(&p.tenant)
            .and_then(|t| t.trace_tokens)
            .unwrap_or(false)),
    }
}

/// The request's latency class: the tenant's (routing config, default interactive), or the
/// `x-serrano-slo-class` header's. Any key may ask for `batch` (deferring itself harms no
/// one); only an admin key or a key granted it (`grant_interactive`) may ask for `interactive`
/// for a batch tenant.
fn slo_class(
    headers: &HeaderMap,
    p: &Principal,
    plan: &Plan<Handle>,
) -> Result<serrano_engine::SloClass, ApiError> {
    use serrano_engine::SloClass;
    use serrano_router::config::Class;
    let tenant = match plan.config.tenants.get(&p.tenant).and_then(|t| t.class) {
        Some(Class::Batch) => SloClass::Batch,
        Some(Class::Interactive) | None => SloClass::Interactive,
    };
    let Some(v) = headers.get(SLO_CLASS_HEADER) else {
        return Ok(tenant);
    };
    match v.to_str().unwrap_or("") {
        "batch" => Ok(SloClass::Batch),
        "interactive"
            if tenant == SloClass::Interactive || p.role == Role::Admin || p.grant_interactive =>
        {
            Ok(SloClass::Interactive)
        }
        "interactive" => Err(GovError::Forbidden(format!(
            "{SLO_CLASS_HEADER}: interactive may only be asked for a batch tenant by an admin key or a key granted it (grant_interactive)"
        ))
        .into()),
        _ => Err(ApiError::invalid(format!(
            "{SLO_CLASS_HEADER} must be 'interactive' or 'batch'"
        ))),
    }
}

/// Routes the request, checks the key may use the model, and records the decision on the ticket.
pub(crate) fn scoped_plan(
    st: &AppState,
    ticket: &Ticket,
    p: &Principal,
    requested: Option<&str>,
) -> Result<(String, Plan<Handle>), ApiError> {
    let forbidden =
        |m: &str| GovError::Forbidden(format!("This API key may not use the model '{m}'"));
    if let Some(m) = requested {
        // The scope is checked before routing, so a key learns nothing of backends it may not use.
        if !p.may_use_model(m) {
            return Err(forbidden(m).into());
        }
    }
    ticket.set_config_version(st.routing.router.active().version);
    let (model, plan) = st.plan(requested, &p.tenant)?;
    if !p.may_use_model(&model) {
        return Err(forbidden(&model).into());
    }
    ticket.set_model(&model);
    Ok((model, plan))
}

/// The output filter of a request. Log-probs would reveal filtered text, and streamed tool
/// calls cannot be filtered whole, so both are refused while completions are filtered.
fn output_guard(p: &Principal, gen: &Generation) -> Result<OutputGuard, ApiError> {
    let guard = OutputGuard::new(p, gen.choices);
    if guard.active() {
        if gen.logprobs.is_some() {
            return Err(ApiError::invalid_param(
                "logprobs",
                "log-probs are not available while the tenant's policy filters completions",
            ));
        }
        let extra = gen.request.extra();
        let tools = ["tools", "functions"]
            .iter()
            .any(|k| extra.get(*k).is_some_and(|v| !v.is_null()));
        if gen.stream && tools {
            return Err(ApiError::invalid_param(
                "stream",
                "streamed tool calls cannot be filtered; send tools with stream: false",
            ));
        }
    }
    Ok(guard)
}

/// The prompt as the audit log keeps it (for tenants whose retention keeps content).
fn prompt_text(request: &Request) -> String {
    let v = match request {
        Request::Chat(r) => serde_json::to_value(&r.messages),
        Request::Completion(r) => serde_json::to_value(&r.prompt),
    };
    v.map(|v| v.to_string()).unwrap_or_default()
}
