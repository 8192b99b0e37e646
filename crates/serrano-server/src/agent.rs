//! Server-side tool use, a serrano extension of `/v1/chat/completions`: a `tools` entry
//! `{"type": "mcp", "server_label": NAME, "allowed_tools": [...]}` (the shape OpenAI's
//! Responses API gives remote MCP servers) offers that MCP server's tools to the model as
//! function tools named `NAME__tool`, and serrano runs the loop: a model step through the one
//! pipeline, the calls it makes through the MCP gateway (every check `/mcp` makes), their
//! results fed back as `tool` messages, until the model answers in words. At most
//! `--max-tool-steps` rounds of calls; the step after the last round is offered no tool
//! (`tool_choice: "none"`), so every loop ends in an answer.
//!
//! Steps are read whole; a client that asked for a stream gets the loop's answer as SSE chunks
//! once it is known.
//!
//! Every model step and every call is a request of its own on the audit log (request ids
//! `ID.step0`, `ID.step0.call0`, ...), reserved, limited and charged like any other; the HTTP
//! request's own record (`ID`) lists the calls made and charges nothing.

use std::collections::HashSet;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{json, Map, Value};
use serrano_api as api;
use serrano_gov::{Principal, Ticket};

use crate::error::ApiError;
use crate::gov::principal;
use crate::mcp::SEPARATOR;
use crate::pipeline;
use crate::relay;
use crate::state::AppState;

/// Most `{"type": "mcp"}` entries one request may have.
pub const MAX_MCP_ENTRIES: usize = 8;
/// The response field listing the calls the loop made (a serrano extension).
pub const CALLS_FIELD: &str = "serrano_tool_calls";

/// One `{"type": "mcp"}` entry of `tools`.
#[derive(Debug, PartialEq)]
struct Entry {
    label: String,
    /// Tool names (without the server's prefix) the model may be offered; all when `None`.
    allowed: Option<Vec<String>>,
}

/// Whether the request asks for server-side tool use.
pub fn requested(req: &api::ChatCompletionRequest) -> bool {
    match req.extra.get("tools") {
        Some(Value::Array(tools)) => tools.iter().any(|t| t["type"] == "mcp"),
        _ => false,
    }
}

/// Runs the loop; the answer, or the error, is on the request's own record.
pub async fn serve(
    st: &Arc<AppState>,
    ticket: Ticket,
    headers: &HeaderMap,
    mut req: api::ChatCompletionRequest,
) -> Response {
    ticket.claim();
    // One deadline for the whole loop, every step and call included.
    let deadline = tokio::time::Instant::now() + st.config.request_timeout;
    // Steps are read whole; a client that asked for a stream gets the answer as one.
    let stream = std::mem::take(&mut req.sampling.stream);
    let include_usage = req
        .sampling
        .stream_options
        .take()
        .is_some_and(|o| o.include_usage);
    match run(st, &ticket, headers, req, deadline).await {
        Ok(answer) => match ticket.finish(200, None).await {
            Ok(_) if stream => relay::whole_as_stream(answer, include_usage),
            Ok(_) => Json(answer).into_response(),
            Err(g) => ApiError::from(g).into_response(),
        },
        Err(e) => pipeline::refuse(&ticket, e).await,
    }
}

async fn run(
    st: &Arc<AppState>,
    ticket: &Ticket,
    headers: &HeaderMap,
    mut req: api::ChatCompletionRequest,
    deadline: tokio::time::Instant,
) -> Result<api::ChatCompletion, ApiError> {
    let p = principal(ticket)?;
    refuse_unsupported(&req)?;
    let (mut tools, entries) = split_tools(&req.extra)?;
    let offered = offer(st, &p, &entries, &mut tools).await?;
    let first_choice = choice(req.extra.get("tool_choice"))?;
    req.extra.insert("tools".into(), Value::Array(tools));
    let max = st.config.max_tool_steps;
    let mut made = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0u32, 0u32);
    for round in 0..=max {
        let choice = match (round, &first_choice) {
            (r, _) if r == max => json!("none"),
            (0, c) => c.clone(),
            (_, c) if c == "none" => json!("none"),
            _ => json!("auto"),
        };
        req.extra.insert("tool_choice".into(), choice);
        let step = ticket.child(&format!("step{round}"));
        step.set_span(crate::trace::sub_request(
            &ticket.span(),
            &format!("tool use step {round}"),
        ));
        let mut answer = pipeline::step(st, &step, headers, req.clone(), deadline).await?;
        ticket.set_model(&answer.model);
        if let Some(u) = &answer.usage {
            prompt_tokens = prompt_tokens.saturating_add(u.prompt_tokens);
            completion_tokens = completion_tokens.saturating_add(u.completion_tokens);
        }
        let calls = match mcp_calls(&answer, &offered) {
            Some(calls) if round < max => calls,
            // An answer in words, a call of the client's own tools, or the last round: the
            // client's answer.
            _ => {
                answer.usage = Some(api::Usage::new(prompt_tokens, completion_tokens));
                answer.extra.insert(CALLS_FIELD.into(), Value::Array(made));
                if let Some(reason) = answer.choices.first().and_then(|c| c.finish_reason.clone()) {
                    ticket.set_finish_reason(&reason);
                }
                return Ok(answer);
            }
        };
        req.messages.push(api::ChatMessage {
            role: "assistant".into(),
            content: None,
            name: None,
            extra: Map::from_iter([("tool_calls".to_string(), json!(calls))]),
        });
        for (k, call) in calls.iter().enumerate() {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::timeout(st.config.request_timeout));
            }
            let output = execute(st, ticket, &p, &format!("step{round}.call{k}"), call).await?;
            made.push(json!({
                "step": round,
                "id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
                "is_error": output.is_error.unwrap_or(false),
                "output": result_text(&output),
            }));
            req.messages.push(api::ChatMessage {
                role: "tool".into(),
                content: Some(api::MessageContent::Text(result_text(&output))),
                name: None,
                extra: Map::from_iter([("tool_call_id".to_string(), json!(call.id))]),
            });
        }
    }
    // The last round offers no tool and returns whatever it answers.
    Err(ApiError::internal("the tool loop ended without an answer"))
}

/// Fields the loop cannot honour, refused by name.
fn refuse_unsupported(req: &api::ChatCompletionRequest) -> Result<(), ApiError> {
    if req.sampling.n.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid_param(
            "n",
            "server-side tool use ({\"type\": \"mcp\"} tools) runs one choice",
        ));
    }
    Ok(())
}

/// The request's function tools (kept as sent) and its `{"type": "mcp"}` entries.
fn split_tools(extra: &api::Extra) -> Result<(Vec<Value>, Vec<Entry>), ApiError> {
    let Some(Value::Array(list)) = extra.get("tools") else {
        return Ok((Vec::new(), Vec::new()));
    };
    let (mut functions, mut entries) = (Vec::new(), Vec::new());
    for (i, t) in list.iter().enumerate() {
        if t["type"] == "mcp" {
            entries.push(entry(i, t)?);
        } else {
            functions.push(t.clone());
        }
    }
    if entries.len() > MAX_MCP_ENTRIES {
        return Err(ApiError::invalid_param(
            "tools",
            format!("at most {MAX_MCP_ENTRIES} tools of type 'mcp'"),
        ));
    }
    Ok((functions, entries))
}

fn entry(i: usize, t: &Value) -> Result<Entry, ApiError> {
    let param = |k: &str| format!("tools[{i}].{k}");
    let obj = t.as_object().cloned().unwrap_or_default();
    for k in obj.keys() {
        match k.as_str() {
            "type" | "server_label" | "allowed_tools" | "require_approval" => {}
            "server_url" | "connector_id" => {
                return Err(ApiError::invalid_param(
                    &param(k),
                    "serrano reaches only the MCP servers its routing config declares: name one with server_label",
                ))
            }
            other => {
                return Err(ApiError::invalid_param(
                    &param(other),
                    format!("'{other}' is not supported on tools of type 'mcp'"),
                ))
            }
        }
    }
    let label = t["server_label"].as_str().unwrap_or("");
    if label.is_empty() || label.len() > 64 {
        return Err(ApiError::invalid_param(
            &param("server_label"),
            "server_label names an MCP server of the routing config",
        ));
    }
    // serrano governs the calls itself (allowlists, filters, budgets, audit); it has no
    // channel to ask a person first.
    match &t["require_approval"] {
        Value::Null => {}
        Value::String(s) if s == "never" => {}
        _ => {
            return Err(ApiError::invalid_param(
                &param("require_approval"),
                "serrano runs the calls without asking: leave require_approval out or set it to 'never'",
            ))
        }
    }
    let names = match &t["allowed_tools"] {
        Value::Null => None,
        // OpenAI's filter object as well as a plain list.
        Value::Object(o) => Some(o.get("tool_names").cloned().unwrap_or(Value::Null)),
        v => Some(v.clone()),
    };
    let allowed = match names {
        None => None,
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => Some(
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param("allowed_tools"),
                "allowed_tools is a list of tool names",
            ))
        }
    };
    Ok(Entry {
        label: label.to_string(),
        allowed,
    })
}

/// Adds the tools of each entry's server that the key may use (and the entry allows) to
/// `tools`, as function tools; returns their names.
async fn offer(
    st: &AppState,
    p: &Principal,
    entries: &[Entry],
    tools: &mut Vec<Value>,
) -> Result<HashSet<String>, ApiError> {
    let mut offered = HashSet::new();
    for e in entries {
        let server = st
            .mcp
            .servers_for(&p.tenant)
            .into_iter()
            .find(|s| s.name == e.label)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "tools",
                    format!("no MCP server '{}' this key may use", e.label),
                )
            })?;
        let listed = st.mcp.tools(p, &server).await.map_err(|err| {
            tracing::warn!(server = %server.name, "MCP tools/list failed: {err}");
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "server_error",
                format!("the MCP server '{}' is unreachable", server.name),
            )
        })?;
        for t in listed {
            let bare = t.name.strip_prefix(&format!("{}{SEPARATOR}", server.name));
            let allowed = match (&e.allowed, bare) {
                (None, _) => true,
                (Some(a), Some(b)) => a.iter().any(|x| x == b),
                (Some(_), None) => false,
            };
            if allowed {
                tools.push(json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description.as_deref().unwrap_or(""),
                        "parameters": Value::Object((*t.input_schema).clone()),
                    },
                }));
                offered.insert(t.name.to_string());
            }
        }
    }
    if offered.is_empty() {
        return Err(ApiError::invalid_param(
            "tools",
            "the MCP servers named offer no tool this key may use",
        ));
    }
    Ok(offered)
}

/// The first step's `tool_choice`: `{"type": "mcp", "server_label", "name"}` names one MCP
/// tool; the rest is passed on as sent.
fn choice(sent: Option<&Value>) -> Result<Value, ApiError> {
    match sent {
        None | Some(Value::Null) => Ok(json!("auto")),
        Some(c) if c["type"] == "mcp" => {
            let (label, name) = (c["server_label"].as_str(), c["name"].as_str());
            let (Some(label), Some(name)) = (label, name) else {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "a tool_choice of type 'mcp' has a server_label and a name",
                ));
            };
            Ok(
                json!({"type": "function", "function": {"name": format!("{label}{SEPARATOR}{name}")}}),
            )
        }
        Some(c) => Ok(c.clone()),
    }
}

/// The calls of the answer's first choice, when it calls tools and every call is to an MCP
/// tool the loop offered (a call to one of the client's own function tools is the client's).
fn mcp_calls(
    answer: &api::ChatCompletion,
    offered: &HashSet<String>,
) -> Option<Vec<api::ToolCall>> {
    let c = answer.choices.first()?;
    let calls = c.message.tool_calls.as_ref()?;
    let ours = !calls.is_empty() && calls.iter().all(|t| offered.contains(&t.function.name));
    (c.finish_reason.as_deref() == Some("tool_calls") && ours).then(|| calls.clone())
}

/// Makes one call through the gateway on a record of its own, and puts it on the request's.
async fn execute(
    st: &AppState,
    ticket: &Ticket,
    p: &Principal,
    suffix: &str,
    call: &api::ToolCall,
) -> Result<CallToolResult, ApiError> {
    let f = &call.function;
    ticket.add_tool_call(&f.name, &f.arguments);
    let record = ticket.child(suffix);
    record.set_span(crate::trace::sub_request(
        &ticket.span(),
        &format!("tool call {}", f.name),
    ));
    let output = match serde_json::from_str::<Value>(&f.arguments) {
        Ok(args @ Value::Object(_)) => st
            .mcp
            .call(&record, p.clone(), &f.name, args)
            .await
            .map_err(|e| ApiError::internal(e.message))?,
        _ => {
            record.add_tool_call(&f.name, &f.arguments);
            record.set_finish_reason("tool_refused");
            CallToolResult::error(vec![ContentBlock::text(
                "the call's arguments are not a JSON object",
            )])
        }
    };
    record.finish(200, None).await?;
    Ok(output)
}

/// What the model reads of a result: its text, else its structured part as JSON.
fn result_text(result: &CallToolResult) -> String {
    let texts: Vec<String> = result
        .content
        .iter()
        .map(|block| match block {
            ContentBlock::Text(t) => t.text.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        })
        .collect();
    match (&result.structured_content, texts.is_empty()) {
        (Some(s), true) => s.to_string(),
        _ => texts.join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(v: Value) -> api::Extra {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn mcp_entries_are_split_from_function_tools() {
        let e = extra(json!({"tools": [
            {"type": "function", "function": {"name": "f"}},
            {"type": "mcp", "server_label": "calc", "allowed_tools": ["add"]},
            {"type": "mcp", "server_label": "w", "allowed_tools": {"tool_names": ["x"]},
             "require_approval": "never"},
        ]}));
        let (functions, entries) = split_tools(&e).unwrap();
        assert_eq!(functions.len(), 1);
        assert_eq!(
            entries,
            vec![
                Entry {
                    label: "calc".into(),
                    allowed: Some(vec!["add".into()])
                },
                Entry {
                    label: "w".into(),
                    allowed: Some(vec!["x".into()])
                },
            ]
        );
    }

    #[test]
    fn what_the_loop_cannot_honour_is_refused_by_name() {
        let refused = |t: Value| split_tools(&extra(json!({"tools": [t]}))).unwrap_err();
        let e = refused(json!({"type": "mcp", "server_label": "x", "server_url": "http://evil"}));
        assert_eq!(e.param.as_deref(), Some("tools[0].server_url"));
        let e = refused(json!({"type": "mcp", "server_label": "x", "require_approval": "always"}));
        assert_eq!(e.param.as_deref(), Some("tools[0].require_approval"));
        let e = refused(json!({"type": "mcp", "server_label": "x", "headers": {}}));
        assert_eq!(e.param.as_deref(), Some("tools[0].headers"));
        let e = refused(json!({"type": "mcp"}));
        assert_eq!(e.param.as_deref(), Some("tools[0].server_label"));
        let e = refused(json!({"type": "mcp", "server_label": "x", "allowed_tools": "add"}));
        assert_eq!(e.param.as_deref(), Some("tools[0].allowed_tools"));
        let many: Vec<Value> = (0..=MAX_MCP_ENTRIES)
            .map(|i| json!({"type": "mcp", "server_label": format!("s{i}")}))
            .collect();
        assert!(split_tools(&extra(json!({ "tools": many }))).is_err());
    }

    #[test]
    fn an_mcp_tool_choice_names_the_prefixed_function() {
        let c = choice(Some(
            &json!({"type": "mcp", "server_label": "calc", "name": "add"}),
        ));
        assert_eq!(
            c.unwrap(),
            json!({"type": "function", "function": {"name": "calc__add"}})
        );
        assert_eq!(choice(None).unwrap(), json!("auto"));
        assert_eq!(choice(Some(&json!("required"))).unwrap(), json!("required"));
        assert!(choice(Some(&json!({"type": "mcp", "server_label": "calc"}))).is_err());
    }

    #[test]
    fn only_calls_of_offered_tools_are_run() {
        let offered: HashSet<String> = ["calc__add".to_string()].into();
        let answer = |names: &[&str], finish: &str| api::ChatCompletion {
            choices: vec![api::ChatChoice {
                index: 0,
                message: api::AssistantMessage {
                    tool_calls: Some(
                        names
                            .iter()
                            .map(|n| api::ToolCall {
                                id: "c".into(),
                                kind: "function".into(),
                                function: api::FunctionCall {
                                    name: n.to_string(),
                                    arguments: "{}".into(),
                                },
                            })
                            .collect(),
                    ),
                    ..Default::default()
                },
                logprobs: None,
                finish_reason: Some(finish.into()),
                extra: Default::default(),
            }],
            ..Default::default()
        };
        assert!(mcp_calls(&answer(&["calc__add"], "tool_calls"), &offered).is_some());
        assert!(mcp_calls(&answer(&["calc__add", "mine"], "tool_calls"), &offered).is_none());
        assert!(mcp_calls(&answer(&["calc__add"], "content_filter"), &offered).is_none());
        assert!(mcp_calls(&answer(&[], "tool_calls"), &offered).is_none());
    }
}
