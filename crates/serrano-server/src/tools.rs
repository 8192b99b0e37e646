//! Tool calling for models whose chat template has no tool support (the default model's): the
//! tools go into the system prompt in one short generic format, the model answers a call as a
//! JSON envelope `{"name": ..., "arguments": {...}}` that a grammar makes valid (a schema for
//! `required` and a named tool; free text or an envelope for `auto`), and the envelope is
//! reported as OpenAI's `tool_calls`. One call per answer (`parallel_tool_calls` is accepted;
//! a model asked for several gets them one turn at a time).

use serde_json::{json, Value};
use serrano_api as api;

use crate::error::ApiError;

/// Most tools one request may offer, and the longest tool name (OpenAI's limits).
pub const MAX_TOOLS: usize = 128;
pub const MAX_TOOL_NAME: usize = 64;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// The arguments' JSON schema.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools of a request and how the model may use them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
}

fn invalid(param: &str, m: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, m)
}

/// The request's tools (`tools`, `tool_choice`), if any are offered.
pub fn parse(extra: &api::Extra) -> Result<Option<Tools>, ApiError> {
    let list = match extra.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(l)) if l.is_empty() => return Ok(None),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(invalid("tools", "tools must be a list")),
    };
    if list.len() > MAX_TOOLS {
        return Err(invalid("tools", format!("at most {MAX_TOOLS} tools")));
    }
    let tools = list
        .iter()
        .enumerate()
        .map(|(i, t)| tool(i, t))
        .collect::<Result<Vec<_>, _>>()?;
    let choice = match extra.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(v) if v["type"] == "function" => {
            let name = v["function"]["name"].as_str().unwrap_or("");
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice names '{}', which is not in tools", trim(name)),
                ));
            }
            Choice::Named(name.to_string())
        }
        Some(_) => {
            return Err(invalid(
                "tool_choice",
                "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    };
    Ok(Some(Tools { tools, choice }))
}

fn trim(s: &str) -> String {
    s.chars().take(MAX_TOOL_NAME).collect()
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    let param = format!("tools[{i}]");
    if t["type"] != "function" {
        return Err(invalid(
            &param,
            "only tools of type 'function' are supported",
        ));
    }
    let f = &t["function"];
    let name = f["name"].as_str().unwrap_or("");
    let valid = !name.is_empty()
        && name.len() <= MAX_TOOL_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(invalid(
            &format!("{param}.function.name"),
            format!("a tool name is 1 to {MAX_TOOL_NAME} characters of [A-Za-z0-9_-]"),
        ));
    }
    let parameters = match &f["parameters"] {
        Value::Null => json!({"type": "object", "properties": {}}),
        p @ Value::Object(_) => p.clone(),
        _ => {
            return Err(invalid(
                &format!("{param}.function.parameters"),
                "parameters must be a JSON schema object",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description: f["description"].as_str().unwrap_or("").to_string(),
        parameters,
    })
}

impl Tools {
    /// Whether the model may call a tool at all.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The tools it may call under `tool_choice`.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            Choice::Named(n) => &t.name == n,
            Choice::None => false,
            Choice::Auto | Choice::Required => true,
        })
    }

    /// The system prompt text that describes the tools: one line each, then the format.
    pub fn prompt(&self) -> String {
        let mut out = String::from("You can call these tools:\n");
        for t in self.callable() {
            let params = serde_json::to_string(&t.parameters).unwrap_or_default();
            out.push_str(&format!(
                "- {}: {} Arguments: {params}\n",
                t.name, t.description
            ));
        }
        out.push_str(match self.choice {
            Choice::Auto => "To call a tool, reply with only JSON: {\"name\": \"<tool>\", \"arguments\": {...}}. Otherwise answer in words.",
            _ => "Reply with only JSON: {\"name\": \"<tool>\", \"arguments\": {...}}.",
        });
        out
    }

    /// The grammar of a call, in llguidance's Lark dialect: one alternative per callable tool,
    /// the envelope's text fixed (name first, as the prompt shows it) and the arguments held to
    /// the tool's schema. A grammar rather than one JSON schema because a schema's properties
    /// have no order once parsed.
    fn calls(&self) -> String {
        let alternatives: Vec<String> = self
            .callable()
            .map(|t| {
                let head = format!("{{\"name\": {}, \"arguments\": ", json!(t.name));
                format!("{} %json {} \"}}\"", json!(head), t.parameters)
            })
            .collect();
        format!("call: {}\n", alternatives.join(" | "))
    }

    /// What the output must follow: a call for `required` and a named tool, a call or text
    /// (which cannot start with `{`) for `auto`; nothing for `none`.
    pub fn grammar(&self) -> Option<String> {
        match self.choice {
            Choice::None => None,
            Choice::Required | Choice::Named(_) => Some(format!("start: call\n{}", self.calls())),
            Choice::Auto => Some(format!(
                "start: call | text\n{}text: /[^{{\\s][^\\x00]*/\n",
                self.calls()
            )),
        }
    }
}

/// A call the model wrote: (name, arguments as JSON text) when `text` is an envelope.
pub fn parse_call(text: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let name = v["name"].as_str()?.to_string();
    let arguments = match &v["arguments"] {
        Value::Null => "{}".to_string(),
        a => a.to_string(),
    };
    Some((name, arguments))
}

/// A call's envelope as the model writes it, streamed as OpenAI streams calls: the tool's
/// name once the head (`{"name": N, "arguments": `) is whole, then the arguments' text as it
/// comes, less the envelope's closing brace (held back: the last character written may be it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    text: String,
    /// Where the arguments start in `text`, once the head is whole.
    args_at: Option<usize>,
    /// How much of `text` has been streamed.
    sent: usize,
}

/// A piece of a call to stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// The head: the tool's name.
    Name(String),
    /// Argument text.
    Arguments(String),
}

/// How an envelope ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// Whole: the rest of its arguments.
    Call(String),
    /// Cut off (`max_tokens`) after its head: the rest of the text written.
    Cut(String),
    /// Cut off before its head was whole: not a call, but text.
    Text(String),
}

impl Envelope {
    /// Adds text the model wrote; returns what may be streamed now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.text.push_str(text);
        let mut out = Vec::new();
        if self.args_at.is_none() {
            let Some((name, at)) = head(&self.text) else {
                return out;
            };
            (self.args_at, self.sent) = (Some(at), at);
            out.push(Piece::Name(name));
        }
        // All but the last character written that is not blank.
        let end = self
            .text
            .trim_end()
            .char_indices()
            .last()
            .map_or(0, |(k, _)| k);
        if end > self.sent {
            out.push(Piece::Arguments(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
        out
    }

    /// The end of the answer: what is left to stream, and whether it made a call.
    pub fn finish(self) -> Ending {
        if self.args_at.is_none() {
            return Ending::Text(self.text);
        }
        let body = self.text.trim_end();
        match parse_call(&self.text) {
            // The closing brace is the body's last character.
            Some(_) => Ending::Call(body[self.sent..body.len() - 1].to_string()),
            None => Ending::Cut(self.text[self.sent..].to_string()),
        }
    }
}

/// The tool's name and where the arguments start, once `text` holds the envelope's whole head
/// (the grammar writes it exactly so).
fn head(text: &str) -> Option<(String, usize)> {
    let rest = text.trim_start().strip_prefix("{\"name\": ")?;
    let mut names = serde_json::Deserializer::from_str(rest).into_iter::<String>();
    let name = names.next()?.ok()?;
    let args = rest[names.byte_offset()..].strip_prefix(", \"arguments\": ")?;
    Some((name, text.len() - args.len()))
}

/// How an earlier assistant turn's tool calls read in the prompt: the envelopes it wrote.
pub fn render_calls(calls: &Value) -> String {
    calls
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = &c["function"];
            let args = f["arguments"]
                .as_str()
                .and_then(|a| serde_json::from_str::<Value>(a).ok())
                .unwrap_or_else(|| f["arguments"].clone());
            format!("{{\"name\": {}, \"arguments\": {args}}}", f["name"])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fresh tool call id, as OpenAI's look.
pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(v: Value) -> api::Extra {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn tools_and_choices_parse_and_bad_ones_name_their_field() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let t = parse(&extra(json!({"tools": tools}))).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Auto);
        assert!(t.prompt().contains("get_weather"));
        let t = parse(&extra(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, Choice::Named("get_weather".into()));
        assert!(parse(&extra(json!({"tools": []}))).unwrap().is_none());
        for (bad, param) in [
            (json!({"tools": "x"}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0]"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": tools, "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
        ] {
            let e = parse(&extra(bad.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn envelopes_stream_their_name_then_their_arguments() {
        let text = r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}"#;
        // Token by token at every split of the text, the pieces reassemble to the call.
        for step in [1, 2, 3, 7] {
            let mut e = Envelope::default();
            let (mut name, mut args) = (None, String::new());
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                for piece in e.push(&chunk.iter().collect::<String>()) {
                    match piece {
                        Piece::Name(n) => {
                            assert!(name.is_none() && args.is_empty());
                            name = Some(n);
                        }
                        Piece::Arguments(a) => args.push_str(&a),
                    }
                }
            }
            match e.finish() {
                Ending::Call(rest) => args.push_str(&rest),
                other => panic!("{other:?}"),
            }
            assert_eq!(name.as_deref(), Some("get_weather"));
            assert_eq!(args, r#"{"city": "Paris", "days": 2}"#);
        }
        // Cut off: before the head it is text; after, the rest as written.
        let mut e = Envelope::default();
        assert!(e.push(r#"{"name": "get_we"#).is_empty());
        assert_eq!(e.finish(), Ending::Text(r#"{"name": "get_we"#.into()));
        let mut e = Envelope::default();
        let pieces = e.push(r#"{"name": "f", "arguments": {"x": 1"#);
        assert_eq!(pieces[0], Piece::Name("f".into()));
        assert_eq!(e.finish(), Ending::Cut("1".into()));
    }

    #[test]
    fn envelopes_parse_back_into_calls() {
        assert_eq!(
            parse_call(r#" {"name": "f", "arguments": {"x": 1}} "#),
            Some(("f".into(), r#"{"x":1}"#.into()))
        );
        assert_eq!(parse_call("hello"), None);
        let calls = json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        assert_eq!(
            render_calls(&calls),
            r#"{"name": "f", "arguments": {"x":1}}"#
        );
    }
}
