//! A governed MCP gateway at `/mcp`, built on the official Rust SDK (`rmcp`), in front of the
//! MCP servers a routing config declares (`[[mcp_server]]`). A client authenticates with its
//! serrano key at the gate like any request; `tools/list` shows only the tools its tenant may use
//! (named `server__tool`, on servers in the tenant's regions); `tools/call` checks the server's
//! tenants and allow/deny lists, the tenant's `allowed_tools`, and residency, counts against the
//! key's rate limits, scans the arguments and the result with the tenant's filters, bounds the
//! result's size and the call's time, and puts the call (server, tool, arguments' sha256,
//! outcome, result bytes) on the request's audit record. Resources and prompts are not offered
//! (the SDK answers them "method not found").
//!
//! The endpoint is stateless and answers in JSON: each HTTP request is one audited request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::Request;
use axum::response::Response;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock as Content,
    ListToolsResult, PaginatedRequestParams, ResultType, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{
    StreamableHttpClientTransport, StreamableHttpServerConfig, StreamableHttpService,
    TokioChildProcess,
};
use rmcp::{ErrorData as McpError, Peer, RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::Value;
use serrano_gov::{GovError, Principal, Ticket};
use serrano_router::config::McpServer;

use crate::routing::Routing;
use crate::safety::{self, OutputGuard};

/// Joins a server's name and its tool's in the names clients see.
pub const SEPARATOR: &str = "__";
/// Longest one tool call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of text a tool's result may carry back.
pub const MAX_RESULT_BYTES: usize = 1 << 20;
/// The audit record's finish reason for a call the tenant's permissions do not allow.
const TOOL_REFUSED: &str = "tool_refused";
/// Longest opening a connection to a server (its handshake included) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a tools/list may wait for one server.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections to the MCP servers, opened on first use and opened again after a failure.
#[derive(Default)]
pub struct McpClients {
    conns: Mutex<HashMap<String, Arc<Conn>>>,
}

/// One server's connection, keyed by its whole spec (a reloaded config with a changed spec
/// gets a new one).
struct Conn {
    spec: McpServer,
    service: tokio::sync::Mutex<Option<RunningService<RoleClient, ()>>>,
}

impl McpClients {
    /// The connection to `spec`; connections to servers no longer in the active config
    /// (`declared`) are dropped, so reloads do not pile them up.
    fn conn(&self, spec: &McpServer, declared: &[McpServer]) -> Arc<Conn> {
        let key = |m: &McpServer| serde_json::to_string(m).unwrap_or_default();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() > declared.len() {
            let keep: Vec<String> = declared.iter().map(key).collect();
            conns.retain(|k, _| keep.contains(k));
        }
        conns
            .entry(key(spec))
            .or_insert_with(|| {
                Arc::new(Conn {
                    spec: spec.clone(),
                    service: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }
}

impl Conn {
    async fn peer(&self) -> Result<Peer<RoleClient>, String> {
        let mut service = self.service.lock().await;
        if service.is_none() {
            // Bounded: callers of this server wait on the lock meanwhile. On a task of its own,
            // outside the caller's trace span: the SDK's connection tasks take the current span
            // and outlive the request, whose span would then never end (nor be exported).
            let spec = self.spec.clone();
            let opening =
                tokio::spawn(
                    async move { tokio::time::timeout(CONNECT_TIMEOUT, connect(&spec)).await },
                );
            let opened = opening
                .await
                .map_err(|e| format!("connecting to '{}' failed: {e}", self.spec.name))?;
            *service = Some(opened.map_err(|_| {
                format!(
                    "MCP server '{}' did not answer within {} s",
                    self.spec.name,
                    CONNECT_TIMEOUT.as_secs()
                )
            })??);
        }
        service
            .as_ref()
            .map(|s| s.peer().clone())
            .ok_or_else(|| "not connected".to_string())
    }

    /// Forgets a connection that failed, so the next call opens a new one.
    async fn reset(&self) {
        if let Some(s) = self.service.lock().await.take() {
            let _ = s.cancel().await;
        }
    }
}

async fn connect(spec: &McpServer) -> Result<RunningService<RoleClient, ()>, String> {
    let failed =
        |e: &dyn std::fmt::Display| format!("cannot reach MCP server '{}': {e}", spec.name);
    match (&spec.url, &spec.command) {
        (Some(url), _) => {
            let mut config = StreamableHttpClientTransportConfig::with_uri(url.clone());
            if let Some(var) = &spec.api_key_env {
                let key = std::env::var(var).map_err(|_| format!("${var} is not set"))?;
                config = config.auth_header(key);
            }
            ().serve(StreamableHttpClientTransport::from_config(config))
                .await
                .map_err(|e| failed(&e))
        }
        (None, Some(command)) => {
            let (program, args) = command.split_first().ok_or("an empty command")?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            let transport = TokioChildProcess::new(cmd).map_err(|e| failed(&e))?;
            ().serve(transport).await.map_err(|e| failed(&e))
        }
        (None, None) => Err("no url or command".into()),
    }
}

/// The gateway's MCP server; one per HTTP request (the endpoint is stateless).
#[derive(Clone)]
pub struct Gateway {
    routing: Arc<Routing>,
    clients: Arc<McpClients>,
}

/// The SDK's Streamable HTTP service over the gateway.
pub type Service = StreamableHttpService<Gateway, NeverSessionManager>;

/// Answers one `/mcp` request, whose body the caller has read.
pub async fn answer(service: &Service, parts: Parts, body: Bytes) -> Response {
    let response = service
        .handle(Request::from_parts(parts, Body::from(body)))
        .await;
    response.map(Body::new)
}

/// The `/mcp` endpoint: rmcp's Streamable HTTP service over the gateway. Host validation is
/// off: every request carries a serrano key checked by the gate, which a rebinding page cannot.
pub fn service(gateway: Gateway) -> Service {
    let mut config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    config.legacy_session_mode = false;
    config.json_response = true;
    StreamableHttpService::new(
        move || Ok(gateway.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// Who is calling: the ticket the gate put on the HTTP request, and its principal.
fn caller(ctx: &RequestContext<RoleServer>) -> Result<(Ticket, Principal), McpError> {
    let ticket = ctx
        .extensions
        .get::<Parts>()
        .and_then(|p| p.extensions.get::<Ticket>())
        .cloned()
        .ok_or_else(|| McpError::internal_error("no authenticated caller", None))?;
    let p = ticket
        .principal()
        .ok_or_else(|| McpError::internal_error("no authenticated caller", None))?;
    Ok((ticket, p))
}

impl Gateway {
    pub fn new(routing: Arc<Routing>) -> Gateway {
        Gateway {
            routing,
            clients: Arc::new(McpClients::default()),
        }
    }

    /// The servers a tenant may reach: listed for it, and in its regions.
    pub fn servers_for(&self, tenant: &str) -> Vec<McpServer> {
        let config = self.routing.router.active().config.clone();
        let regions = config.tenant_regions(tenant).map(<[String]>::to_vec);
        config
            .mcp_servers
            .iter()
            .filter(|m| {
                m.tenants
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|x| x == tenant))
            })
            .filter(|m| regions.as_ref().is_none_or(|r| r.contains(&m.region)))
            .cloned()
            .collect()
    }

    /// Whether the tenant may call `tool` (its exposed name) on `server`.
    fn permitted(p: &Principal, server: &McpServer, tool: &str) -> bool {
        let exposed = format!("{}{SEPARATOR}{tool}", server.name);
        server.permits(&p.tenant, tool)
            && p.filter
                .as_ref()
                .is_none_or(|f| f.check_tools(&[exposed.as_str()]).is_ok())
    }
}

/// A call the gateway does not make (or whose result it withholds): an error result the model
/// can read, and why on the audit record.
fn refused(ticket: &Ticket, reason: &str, message: String) -> CallToolResult {
    ticket.set_finish_reason(reason);
    CallToolResult::error(vec![Content::text(message)])
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("serrano's governed MCP gateway: tools are named server__tool.")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let (_, p) = caller(&ctx)?;
        let mut tools = Vec::new();
        for server in self.servers_for(&p.tenant) {
            match self.tools(&p, &server).await {
                Ok(listed) => tools.extend(listed),
                // One unreachable server does not hide the others' tools.
                Err(e) => tracing::warn!(server = %server.name, "MCP tools/list failed: {e}"),
            }
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let (ticket, p) = caller(&ctx)?;
        let args = Value::Object(request.arguments.unwrap_or_default());
        let result = self.call(&ticket, p, &request.name, args).await?;
        Ok(result.into())
    }
}

impl Gateway {
    /// The tools `p`'s tenant may call on `server`, named `server__tool`.
    pub async fn tools(&self, p: &Principal, server: &McpServer) -> Result<Vec<Tool>, String> {
        let conn = self
            .clients
            .conn(server, &self.routing.router.active().config.mcp_servers);
        let listed = match conn.peer().await {
            Ok(peer) => tokio::time::timeout(LIST_TIMEOUT, peer.list_all_tools())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e),
        };
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                conn.reset().await;
                return Err(e);
            }
        };
        let mut tools = Vec::new();
        for mut tool in listed {
            if Self::permitted(p, server, &tool.name) {
                tool.name = format!("{}{SEPARATOR}{}", server.name, tool.name).into();
                tools.push(tool);
            }
        }
        Ok(tools)
    }

    /// Makes one tool call (`exposed` is `server__tool`) for `p` under every check, on
    /// `ticket`'s record: its name and arguments' sha256, the server as model and route, and
    /// what came of it as the finish reason. A refused or failed call is an error result the
    /// model can read; `Err` only when the gateway itself failed.
    pub async fn call(
        &self,
        ticket: &Ticket,
        p: Principal,
        exposed: &str,
        mut args: Value,
    ) -> Result<CallToolResult, McpError> {
        let ticket = ticket.clone();
        let args_bytes = {
            let text = args.to_string();
            ticket.add_tool_call(exposed, &text);
            text.len()
        };
        let Some((server_name, tool)) = exposed.split_once(SEPARATOR) else {
            let message = format!("unknown tool '{exposed}'; tools are named server__tool");
            return Ok(refused(&ticket, TOOL_REFUSED, message));
        };
        let Some(server) = self
            .servers_for(&p.tenant)
            .into_iter()
            .find(|s| s.name == server_name)
        else {
            let message = format!("no MCP server '{server_name}' this key may use");
            return Ok(refused(&ticket, TOOL_REFUSED, message));
        };
        if !Self::permitted(&p, &server, tool) {
            let message = format!("this key may not use the tool '{exposed}'");
            return Ok(refused(&ticket, TOOL_REFUSED, message));
        }
        let version = self.routing.router.active().version;
        ticket.set_model(&format!("mcp:{}", server.name));
        ticket.set_route(&server.name, &server.region, "mcp", version);
        // A call is one request and one token against the key's and tenant's limits and
        // budgets (priced at the `mcp:SERVER` model's input price, if one is set), and one
        // call against their tool-call limits: a tenant whose token budget is spent cannot
        // call tools.
        let counted = match ticket.reserve_tool_call().await {
            Ok(r) => r,
            Err(e) => {
                let reason = match e {
                    GovError::OverBudget(_) => "over_budget",
                    GovError::RateLimited { .. } => "rate_limited",
                    _ => "unavailable",
                };
                return Ok(refused(&ticket, reason, e.to_string()));
            }
        };
        let args = match off_workers(&p, args_bytes, {
            let (scan, t) = (p.clone(), ticket.clone());
            move || safety::filter_value(&scan, &t, &mut args).map(|()| args)
        })
        .await?
        {
            Ok(args) => args,
            Err(e) => return Ok(refused(&ticket, safety::CONTENT_FILTER, e.message)),
        };
        let conn = self
            .clients
            .conn(&server, &self.routing.router.active().config.mcp_servers);
        let peer = match conn.peer().await {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("{e}");
                let message = format!("the MCP server '{}' is unreachable", server.name);
                return Ok(refused(&ticket, "tool_unreachable", message));
            }
        };
        let span = crate::trace::mcp_call(&ticket.span(), &server.name, tool);
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = args.as_object().cloned();
        params.meta = crate::trace::mcp_meta(&span);
        // Sent: charged from here on, whatever comes back (the server may have done the work).
        counted.accept(true);
        let call = tokio::time::timeout(CALL_TIMEOUT, peer.call_tool(params));
        let answered = tracing::Instrument::instrument(call, span.clone()).await;
        let failed = |kind: &str| {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", kind);
        };
        let result = match answered {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(server = %server.name, "MCP tools/call failed: {e}");
                failed("tool_failed");
                conn.reset().await;
                let message = format!("the MCP server '{}' failed", server.name);
                return Ok(refused(&ticket, "tool_failed", message));
            }
            Err(_) => {
                failed("tool_timeout");
                let message = format!(
                    "the tool did not answer within {} s",
                    CALL_TIMEOUT.as_secs()
                );
                return Ok(refused(&ticket, "tool_timeout", message));
            }
        };
        let version = self.routing.router.active().version;
        let t = ticket.clone();
        off_workers(&p.clone(), result_bytes(&result), move || {
            checked(&p, &t, &server, version, result)
        })
        .await
    }
}

/// Most bytes a filter scans on an async worker: a scan that small takes microseconds, less
/// than the hop to a blocking thread and back (~0.05 ms at the median, ~0.35 ms at p90, measured
/// through `/mcp` on this machine's two cores). Larger ones run on the blocking pool, as a
/// prompt's do, so that a megabyte's scan does not stall other connections.
const INLINE_SCAN_BYTES: usize = 16 << 10;

/// Runs `scan`, over `bytes` of a call's arguments or result, where it costs least: inline when
/// the tenant has no filter or the text is small, else on a blocking thread.
async fn off_workers<T: Send + 'static>(
    p: &Principal,
    bytes: usize,
    scan: impl FnOnce() -> T + Send + 'static,
) -> Result<T, McpError> {
    if p.filter.is_none() || bytes <= INLINE_SCAN_BYTES {
        return Ok(scan());
    }
    tokio::task::spawn_blocking(scan)
        .await
        .map_err(|e| McpError::internal_error(e.to_string(), None))
}

/// A tool's result, through the size limit and the tenant's output filter; its size and outcome
/// go on the record. Scans: call it on a blocking thread.
fn checked(
    p: &Principal,
    ticket: &Ticket,
    server: &McpServer,
    version: u64,
    mut result: CallToolResult,
) -> CallToolResult {
    let bytes = result_bytes(&result);
    let reason = format!("mcp: {bytes} bytes of result");
    ticket.set_route(&server.name, &server.region, &reason, version);
    // Refused before it is scanned: a filter pass over megabytes costs seconds.
    if bytes > MAX_RESULT_BYTES {
        ticket.set_finish_reason("tool_result_too_large");
        return CallToolResult::error(vec![Content::text(format!(
            "the tool's result is larger than {MAX_RESULT_BYTES} bytes"
        ))]);
    }
    let mut guard = OutputGuard::new(p, 1);
    if guard.active() {
        for block in &mut result.content {
            match block {
                Content::Text(text) => text.text = guard.filter_whole(0, &text.text),
                // What the output filter cannot scan does not leave while it is on.
                other => *other = Content::text("[content the tenant's output filter cannot scan]"),
            }
        }
        if let Some(structured) = &mut result.structured_content {
            filter_strings(&mut guard, structured);
        }
    }
    guard.record(ticket);
    if guard.blocked(0) {
        ticket.set_finish_reason(safety::CONTENT_FILTER);
        return CallToolResult::error(vec![Content::text(
            "the tool's result was blocked by the tenant's policy",
        )]);
    }
    // An upstream on an older protocol version leaves it out; the client may be on the
    // current one, which requires it (the SDK strips it again for older clients).
    result.result_type = Some(ResultType::COMPLETE);
    let failed = result.is_error.unwrap_or(false);
    ticket.set_finish_reason(if failed { "tool_error" } else { "tool_result" });
    result
}

/// Bytes a result carries: its text, other content as JSON, and its structured part.
fn result_bytes(result: &CallToolResult) -> usize {
    let content: usize = result
        .content
        .iter()
        .map(|block| match block {
            Content::Text(text) => text.text.len(),
            other => serde_json::to_string(other).map_or(0, |t| t.len()),
        })
        .sum();
    let structured = result
        .structured_content
        .as_ref()
        .map_or(0, |v| v.to_string().len());
    content + structured
}

/// Runs every string inside a tool's structured result through the output filter.
fn filter_strings(guard: &mut OutputGuard, v: &mut Value) {
    match v {
        Value::String(s) => *s = guard.filter_whole(0, s),
        Value::Array(items) => items.iter_mut().for_each(|x| filter_strings(guard, x)),
        Value::Object(map) => map.values_mut().for_each(|x| filter_strings(guard, x)),
        _ => {}
    }
}
