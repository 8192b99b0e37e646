#!/usr/bin/env python3
"""Constrained decoding's cost: TPOT of streamed chats with and without a JSON schema, at 1 and
32 concurrent streams, alternating (free, schema, free, schema), 3 rounds each; 128 tokens per
answer (the schema's free-text field runs to max_tokens, so both produce as many tokens).
Usage: bench-constrained.py BASE_URL (a serrano serving the default model, --allow-anonymous).
The engine's own mask time is `serrano:constraint_mask_seconds` in /metrics."""
import json, time, urllib.request, sys, threading
base = sys.argv[1]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}, "bio": {"type": "string"}}, "required": ["name", "age", "city", "bio"], "additionalProperties": False}
def one(constrained, results):
    body = {"messages": [{"role": "user", "content": "Invent a person and describe them at length."}], "max_tokens": 128, "temperature": 0.8, "seed": 1, "stream": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time(); times = []
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"content"' in line:
                times.append(time.time())
    if len(times) > 2:
        results.append(((times[-1] - times[0]) / (len(times) - 1) * 1000, len(times)))
def run(constrained, streams, rounds=3):
    res = []
    for _ in range(rounds):
        ts = [threading.Thread(target=one, args=(constrained, res)) for _ in range(streams)]
        [t.start() for t in ts]; [t.join() for t in ts]
    tp = sorted(r[0] for r in res)
    return tp[len(tp)//2], sum(r[1] for r in res) / len(res)
for streams in (1, 32):
    for c in (False, True, False, True):
        m, n = run(c, streams)
        print(f"streams {streams} {'schema' if c else 'free  '}: TPOT p50 {m:.2f} ms ({n:.0f} chunks per answer)")
