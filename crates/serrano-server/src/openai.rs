//! The OpenAI-compatible routes: chat and legacy completions (both through the one pipeline,
//! whatever backend serves them), models, and vLLM's tokenize/detokenize (local engines; a
//! gateway forwards `/tokenize` to its backend).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use serrano_api as api;
use serrano_gov::{GovError, Reservation, Ticket};

use crate::agent;
use crate::backend::Request;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::gov::principal;
use crate::local::{chat_prompt, encode};
use crate::pipeline;
use crate::state::AppState;

type St = State<Arc<AppState>>;

pub async fn chat_completions(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<api::ChatCompletionRequest>,
) -> Response {
    if agent::requested(&req) {
        return agent::serve(&st, ticket, &headers, req).await;
    }
    pipeline::serve(&st, ticket, &headers, Request::Chat(req)).await
}

pub async fn completions(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<api::CompletionRequest>,
) -> Response {
    pipeline::serve(&st, ticket, &headers, Request::Completion(req)).await
}

pub async fn models(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
) -> Result<Json<api::ModelList>, ApiError> {
    let p = principal(&ticket)?;
    let dep = st.routing.router.active();
    let data = st
        .routing
        .router
        .models()
        .into_iter()
        .filter(|(id, _)| p.may_use_model(id))
        .map(|(id, backends)| {
            let handles = dep
                .config
                .backends
                .iter()
                .zip(&dep.handles)
                .filter(|(b, _)| backends.contains(&b.name));
            // The local engines' context; remotes report theirs to their own clients.
            let local = handles
                .clone()
                .find(|(_, h)| h.engine().is_some())
                .and_then(|(b, h)| h.context_length(b.serves(&id)?));
            let (owned_by, max_model_len) = match local {
                Some(ctx) => ("serrano".to_string(), ctx as u32),
                None => (backends.join(","), 0),
            };
            api::ModelCard {
                id,
                object: "model".into(),
                created: st.started,
                owned_by,
                max_model_len,
            }
        })
        .collect();
    Ok(Json(api::ModelList {
        object: "list".into(),
        data,
    }))
}

/// The engine serving the requested model, once the key may use it and its rate limits
/// admit one more request (a reservation of no tokens: it counts against requests per minute
/// and concurrency, and settles as nothing).
async fn engine_for(
    st: &AppState,
    ticket: &Ticket,
    model: Option<&str>,
) -> Result<(serrano_engine::EngineHandle, Reservation), ApiError> {
    let model = model.filter(|m| !m.is_empty());
    if let Some(m) = model {
        if !principal(ticket)?.may_use_model(m) {
            return Err(
                GovError::Forbidden(format!("This API key may not use the model '{m}'")).into(),
            );
        }
    }
    let engine = st.routing.local_engine(model)?;
    ticket.set_model(model.unwrap_or_default());
    let reservation = ticket.reserve(0, 0).await?;
    Ok((engine, reservation))
}

pub async fn tokenize(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    JsonBody(req): JsonBody<api::TokenizeRequest>,
) -> Result<Json<api::TokenizeResponse>, ApiError> {
    let (engine, _counted) = match engine_for(&st, &ticket, req.model.as_deref()).await {
        Ok(found) => found,
        // No engine of this process serves the model (a gateway): a remote backend may.
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return tokenize_remote(&st, &ticket, req).await.map(Json)
        }
        Err(e) => return Err(e),
    };
    let info = engine.info();
    let tokens = match (req.prompt, &req.messages) {
        (Some(p), None) => {
            encode(info, "prompt", p, req.add_special_tokens.unwrap_or(true)).await?
        }
        (None, Some(m)) => chat_prompt(info, m, None, req.add_generation_prompt).await?,
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

/// `/tokenize` forwarded to the first backend the router would send the tenant's request for
/// the model to (its regions, tiers and health rules hold: the prompt goes nowhere a
/// generation could not) that has the route; counted against the key's limits as a local one.
async fn tokenize_remote(
    st: &AppState,
    ticket: &Ticket,
    mut req: api::TokenizeRequest,
) -> Result<api::TokenizeResponse, ApiError> {
    let p = principal(ticket)?;
    let requested = req.model.as_deref().filter(|m| !m.is_empty());
    let (model, plan) = pipeline::scoped_plan(st, ticket, &p, requested)?;
    let _counted = ticket.reserve(0, 0).await?;
    let mut first_error = None;
    for c in &plan.candidates {
        req.model = Some(c.model.clone());
        match c.handle.tokenize(&req).await {
            Some(Ok(r)) => return Ok(r),
            Some(Err(e)) if !e.retryable() => return Err(e.into()),
            Some(Err(e)) => {
                first_error.get_or_insert(e.error);
            }
            None => {}
        }
    }
    Err(first_error.unwrap_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("No backend this key may use for '{model}' tokenizes"),
        )
    }))
}

pub async fn detokenize(
    State(st): St,
    Extension(ticket): Extension<Ticket>,
    JsonBody(req): JsonBody<api::DetokenizeRequest>,
) -> Result<Json<api::DetokenizeResponse>, ApiError> {
    let (engine, _counted) = engine_for(&st, &ticket, req.model.as_deref()).await?;
    let tok = &engine.info().tokenizer;
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
