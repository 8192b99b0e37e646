#!/usr/bin/env python3
"""The MCP gateway's cost: latency of `tools/call` straight to an MCP server and through serrano's
`/mcp` (key check, permissions, rate-limit counting, filters, audit record), sequentially and with
16 concurrent clients. Starts everything itself on loopback:

    target/mcpenv/bin/python scripts/bench-mcp.py target/release/serrano [CALLS]

The MCP server is crates/serrano/tests/mcp_server.py (the official Python SDK, Streamable HTTP,
stateless, JSON answers); serrano runs `gateway --config` on a fresh database in a temp dir.
Clients are the SDK's own, one session per client, calling `add` CALLS times (default 300)."""
import asyncio, json, os, socket, subprocess, sys, tempfile, time, urllib.request

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

serrano, calls = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
here = os.path.dirname(os.path.abspath(__file__))
server_py = os.path.join(here, "..", "crates", "serrano", "tests", "mcp_server.py")
ADMIN = "sk-bench-admin-0123456789abcdef0123456789abcdef"


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait(port):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close(); return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def admin(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


async def session(url, key, n, lat):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as h:
        async with Client(streamable_http_client(url, http_client=h)) as c:
            for i in range(n):
                t = time.perf_counter()
                r = await c.call_tool("add" if key is None else "tools__add", {"a": i, "b": 1})
                lat.append(time.perf_counter() - t)
                assert not r.is_error, r


async def measure(url, key, clients):
    lat = []
    t = time.perf_counter()
    await asyncio.gather(*(session(url, key, calls // clients if clients > 1 else calls, lat) for _ in range(clients)))
    wall = time.perf_counter() - t
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    return pct(0.5), pct(0.99), len(lat) / wall


def main():
    tmp = tempfile.mkdtemp()
    mport, sport = free_port(), free_port()
    mcp = subprocess.Popen([sys.executable, server_py, "tools", str(mport)], stdout=subprocess.DEVNULL)
    cfg = os.path.join(tmp, "routing.toml")
    with open(cfg, "w") as f:
        f.write(f'[[mcp_server]]\nname = "tools"\nurl = "http://127.0.0.1:{mport}/mcp"\nregion = "here"\n')
    env = dict(os.environ, SERRANO_ADMIN_KEY=ADMIN, RUST_LOG="warn")
    srv = subprocess.Popen([serrano, "gateway", "--config", cfg, "--port", str(sport), "--db", os.path.join(tmp, "db")], env=env, stderr=subprocess.DEVNULL)
    try:
        wait(mport); wait(sport)
        base = f"http://127.0.0.1:{sport}"
        admin(base, "/admin/v1/tenants", {"name": "bench"})
        admin(base, "/admin/v1/tenants/bench/policy", {"pii": "redact", "pii_on_output": True})
        key = admin(base, "/admin/v1/keys", {"tenant": "bench"})["key"]
        print(f"{calls} calls of `add` per row; p50 and p99 per call in ms; calls/s over the row's wall time")
        print("| path | clients | p50 ms | p99 ms | calls/s |\n| --- | --- | --- | --- | --- |")
        for clients in (1, 16):
            for name, url, k in (("direct", f"http://127.0.0.1:{mport}/mcp", None), ("through serrano /mcp", f"{base}/mcp", key)):
                asyncio.run(measure(url, k, clients))  # warm-up round, same shape
                p50, p99, rate = asyncio.run(measure(url, k, clients))
                print(f"| {name} | {clients} | {p50:.2f} | {p99:.2f} | {rate:.0f} |", flush=True)
    finally:
        srv.terminate(); mcp.terminate(); srv.wait(); mcp.wait()


main()
