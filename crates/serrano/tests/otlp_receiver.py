#!/usr/bin/env python3
"""An OTLP trace receiver for the tests, on the OpenTelemetry project's own protocol definitions
(`opentelemetry-proto`) and gRPC's Python server: the TraceService over gRPC and POST /v1/traces
over HTTP (protobuf, gzip allowed). Each span received becomes a JSON line in --out (ids in hex,
attribute values as strings). Prints `grpc=PORT http=PORT` once both listen.

    otlp_receiver.py --out spans.jsonl [--grpc-port 0] [--http-port 0]
"""
import argparse
import gzip
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

LOCK = threading.Lock()


def values(attributes):
    """Attribute key -> value as a string (OTLP's JSON mapping writes ints as strings)."""
    out = {}
    for kv in attributes:
        v = MessageToDict(kv.value)
        out[kv.key] = str(next(iter(v.values()))) if v else None
    return out


def write(request, transport, out):
    lines = []
    for rs in request.resource_spans:
        resource = values(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "transport": transport,
                    "service": resource.get("service.name"),
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                    "status": s.status.code,
                    "attributes": values(s.attributes),
                    "events": [{
                        "name": e.name,
                        "time_ns": e.time_unix_nano,
                        "attributes": values(e.attributes),
                    } for e in s.events],
                }))
    with LOCK:
        out.write("".join(line + "\n" for line in lines))
        out.flush()


class TraceService(pb_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        write(request, "grpc", self.out)
        return pb.ExportTraceServiceResponse()


def http_handler(out):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = pb.ExportTraceServiceRequest()
            request.ParseFromString(body)
            write(request, "http", out)
            reply = pb.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = open(a.out, "a", buffering=1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TraceServiceServicer_to_server(TraceService(out), server)
    grpc_port = server.add_insecure_port(f"127.0.0.1:{a.grpc_port}")
    server.start()
    httpd = ThreadingHTTPServer(("127.0.0.1", a.http_port), http_handler(out))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"grpc={grpc_port} http={httpd.server_address[1]}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
