//! The tenant's safety filters on the request path: prompts (chat message text, completion
//! prompt strings) and requested tools before anything runs, completions as they stream. Every
//! verdict goes into the request's audit record; matched text never does.

use std::sync::Arc;

use serde_json::Value;
use serrano_api::{ContentPart, MessageContent, PromptSpec};
use serrano_gov::{Principal, Ticket};
use serrano_safety::{Filter, OutputScanner, PromptOutcome, Verdict};

use crate::backend::Request;
use crate::error::ApiError;

/// The OpenAI finish reason of a choice cut off by a filter.
pub const CONTENT_FILTER: &str = "content_filter";

fn refused(reason: String) -> ApiError {
    ApiError {
        code: Some("content_policy_violation".into()),
        ..ApiError::invalid(reason)
    }
}

fn record(ticket: &Ticket, verdicts: &[Verdict]) {
    for v in verdicts {
        ticket.add_verdict(serde_json::to_value(v).unwrap_or(Value::Null));
    }
}

/// Names of the tools a request offers (`tools[].function.name`, legacy `functions[].name`).
pub fn tool_names(extra: &serrano_api::Extra) -> Vec<&str> {
    let list = |k: &str| extra.get(k).and_then(Value::as_array).into_iter().flatten();
    list("tools")
        .filter_map(|t| t["function"]["name"].as_str())
        .chain(list("functions").filter_map(|f| f["name"].as_str()))
        .collect()
}

/// Checks one text in place: redacted text replaces it, a block refuses the request.
fn check_text(f: &Filter, ticket: &Ticket, text: &mut String) -> Result<(), ApiError> {
    match f.check_prompt(text) {
        PromptOutcome::Allow { verdicts } => record(ticket, &verdicts),
        PromptOutcome::Redacted { text: t, verdicts } => {
            record(ticket, &verdicts);
            *text = t;
        }
        PromptOutcome::Blocked { verdicts, reason } => {
            record(ticket, &verdicts);
            return Err(refused(reason));
        }
    }
    Ok(())
}

/// Applies the prompt and tool filters to a request, redacting in place: every text that
/// reaches the model (message content, content parts joined as the chat template joins them,
/// names, tool-call arguments and other fields of messages, tool descriptions and schemas).
/// Token-id prompts carry no text to check and pass as they are. CPU-bound: call it off the
/// async workers ([`filter_off_workers`]).
pub fn filter_request(
    p: &Principal,
    ticket: &Ticket,
    request: &mut Request,
) -> Result<(), ApiError> {
    let Some(f) = &p.filter else { return Ok(()) };
    let names = tool_names(request.extra());
    if !names.is_empty() {
        if let Err((verdict, reason)) = f.check_tools(&names) {
            record(ticket, &[verdict]);
            return Err(refused(reason));
        }
    }
    match request {
        Request::Chat(r) => {
            for m in &mut r.messages {
                if let Some(content) = &mut m.content {
                    check_content(f, ticket, content)?;
                }
                if let Some(name) = &mut m.name {
                    check_text(f, ticket, name)?;
                }
                for v in m.extra.values_mut() {
                    check_strings(f, ticket, v)?;
                }
            }
            for key in ["tools", "functions"] {
                if let Some(v) = r.extra.get_mut(key) {
                    check_strings(f, ticket, v)?;
                }
            }
        }
        Request::Completion(r) => match &mut r.prompt {
            PromptSpec::Text(t) => check_text(f, ticket, t)?,
            PromptSpec::Texts(ts) => {
                for t in ts {
                    check_text(f, ticket, t)?;
                }
            }
            PromptSpec::Tokens(_) | PromptSpec::TokenLists(_) => {}
        },
    }
    Ok(())
}

/// Applies the tenant's prompt filters to every string inside a JSON value (an MCP tool call's
/// arguments), redacting in place; a block refuses it.
pub fn filter_value(p: &Principal, ticket: &Ticket, v: &mut Value) -> Result<(), ApiError> {
    match &p.filter {
        Some(f) => check_strings(f, ticket, v),
        None => Ok(()),
    }
}

/// [`filter_request`] on a blocking thread: a long prompt's scan must not stall other
/// connections. Returns the (possibly redacted) request.
pub async fn filter_off_workers(
    p: &Principal,
    ticket: &Ticket,
    mut request: Request,
) -> Result<Request, ApiError> {
    if p.filter.is_none() {
        return Ok(request);
    }
    let (p, ticket) = (p.clone(), ticket.clone());
    tokio::task::spawn_blocking(move || filter_request(&p, &ticket, &mut request).map(|()| request))
        .await
        .map_err(ApiError::internal)?
}

/// A message's content as the template sees it: text parts are joined without a separator
/// (`MessageContent::text`), so a term or an address split across parts is checked whole. When
/// the joined text is redacted, the text parts become one part holding it, where the first was.
fn check_content(
    f: &Filter,
    ticket: &Ticket,
    content: &mut MessageContent,
) -> Result<(), ApiError> {
    let parts = match content {
        MessageContent::Text(t) => return check_text(f, ticket, t),
        MessageContent::Parts(parts) => parts,
    };
    let joined: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
    let mut checked = joined.clone();
    check_text(f, ticket, &mut checked)?;
    if checked != joined {
        let first = parts.iter().position(|p| p.text.is_some());
        let mut kept: Vec<ContentPart> = Vec::with_capacity(parts.len());
        for (i, p) in parts.drain(..).enumerate() {
            match (p.text.is_some(), Some(i) == first) {
                (true, true) => kept.push(ContentPart {
                    text: Some(std::mem::take(&mut checked)),
                    ..p
                }),
                (true, false) => {}
                (false, _) => kept.push(p),
            }
        }
        *parts = kept;
    }
    Ok(())
}

/// Every string inside a JSON value (tool descriptions and schemas, tool-call arguments).
fn check_strings(f: &Filter, ticket: &Ticket, v: &mut Value) -> Result<(), ApiError> {
    match v {
        Value::String(s) => check_text(f, ticket, s),
        Value::Array(items) => items
            .iter_mut()
            .try_for_each(|i| check_strings(f, ticket, i)),
        Value::Object(map) => map
            .values_mut()
            .try_for_each(|i| check_strings(f, ticket, i)),
        _ => Ok(()),
    }
}

/// Output filtering for the choices of one response: each choice's text goes through its own
/// scanner, which may hold back text that could still turn out to be PII.
pub struct OutputGuard {
    scanners: Vec<Option<OutputScanner>>,
    filter: Option<Arc<Filter>>,
}

impl OutputGuard {
    pub fn new(p: &Principal, choices: usize) -> OutputGuard {
        let scanners = (0..choices)
            .map(|_| p.filter.as_ref().and_then(|f| f.output_scanner()))
            .collect();
        OutputGuard {
            scanners,
            filter: p.filter.clone(),
        }
    }

    /// Whether completions are scanned (then log-probs, which would reveal the text, are refused).
    pub fn active(&self) -> bool {
        self.scanners.iter().any(Option::is_some)
    }

    /// Text of choice `i` that may be shown now. A choice the request did not ask for (an
    /// upstream's stray index) shows nothing while filtering is on.
    pub fn push(&mut self, i: usize, text: &str) -> String {
        let active = self.active();
        match self.scanners.get_mut(i) {
            Some(Some(s)) => s.push(text),
            None if active => String::new(),
            _ => text.to_string(),
        }
    }

    /// A whole piece of text outside the choices' streams (tool-call arguments), redacted in
    /// one go with the policy's PII kinds.
    pub fn redact_once(&self, text: &str) -> String {
        match &self.filter {
            Some(f) if self.active() => {
                let kinds = f.policy().effective_pii_kinds();
                serrano_safety::redact(text, &serrano_safety::scan_pii(text, &kinds))
            }
            _ => text.to_string(),
        }
    }

    /// The rest of choice `i`, at its end.
    pub fn finish(&mut self, i: usize) -> String {
        match self.scanners.get_mut(i) {
            Some(Some(s)) => s.finish(),
            _ => String::new(),
        }
    }

    pub fn blocked(&self, i: usize) -> bool {
        match self.scanners.get(i) {
            Some(Some(s)) => s.blocked(),
            None => self.active(),
            Some(None) => false,
        }
    }

    /// The finish reason to report for choice `i`.
    pub fn finish_reason<'a>(&self, i: usize, reason: &'a str) -> &'a str {
        if self.blocked(i) {
            CONTENT_FILTER
        } else {
            reason
        }
    }

    /// Whole texts at once (non-streamed responses).
    pub fn filter_whole(&mut self, i: usize, text: &str) -> String {
        let mut out = self.push(i, text);
        out.push_str(&self.finish(i));
        out
    }

    /// Checks the tool names a response calls; `false` if one is not allowed.
    pub fn tools_allowed(&self, ticket: &Ticket, names: &[&str]) -> bool {
        match &self.filter {
            Some(f) if !names.is_empty() => match f.check_tools(names) {
                Ok(_) => true,
                Err((verdict, _)) => {
                    record(ticket, &[verdict]);
                    false
                }
            },
            _ => true,
        }
    }

    /// Puts the output verdicts on the audit record.
    pub fn record(&self, ticket: &Ticket) {
        let verdicts: Vec<Verdict> = self
            .scanners
            .iter()
            .flatten()
            .filter_map(|s| s.verdict())
            .collect();
        record(ticket, &verdicts);
    }
}
