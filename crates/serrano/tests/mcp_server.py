"""An MCP server from the official Python SDK (`mcp`), for the gateway tests.

    python mcp_server.py NAME PORT [TOKEN]   # Streamable HTTP at http://127.0.0.1:PORT/mcp
    python mcp_server.py NAME stdio          # on stdin/stdout

With TOKEN, every HTTP request must carry `Authorization: Bearer TOKEN` (a 401 otherwise), so a
test sees that the gateway sends the key its config names.

With OTEL_EXPORTER_OTLP_ENDPOINT set (and the OpenTelemetry SDK and OTLP/HTTP exporter
installed), the SDK's own spans (one per request, a child of the trace context the request's
`_meta` carries) are exported there as service `mcp-NAME`.
"""

import os
import sys

from mcp.server.mcpserver import MCPServer

name = sys.argv[1]
server = MCPServer(name)


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Returns the text it was given, prefixed with the server's name (shows what arrived)."""
    return f"{name} got: {text}"


@server.tool()
def contact() -> str:
    """Returns a text with an email address in it (for output filters)."""
    return "write to alice@example.com for access"


@server.tool()
def secret() -> str:
    """A tool the gateway's config denies."""
    return "the launch codes"


@server.tool()
def big() -> str:
    """Two MiB of text, over the gateway's result limit."""
    return "x" * (2 << 20)


def export_traces() -> None:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"mcp-{name}"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    export_traces()
    if sys.argv[2] == "stdio":
        server.run()
        return
    import uvicorn
    from starlette.responses import PlainTextResponse

    app = server.streamable_http_app(json_response=True, stateless_http=True)
    token = sys.argv[3] if len(sys.argv) > 3 else None

    async def guarded(scope, receive, send):
        if token and scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await PlainTextResponse("no or wrong token", status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    uvicorn.run(guarded, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


main()
