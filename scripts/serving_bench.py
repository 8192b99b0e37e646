#!/usr/bin/env python3
"""Fixed-workload serving benchmark against any OpenAI-compatible /v1/completions endpoint.

    scripts/serving_bench.py --base-url http://127.0.0.1:8080 --prompt-ids ids.json \
        --concurrency 1 4 16 32 [--requests-per-stream 2] [--max-tokens 128]

Closed loop: C client threads, each sending requests back to back, streaming, with a fixed
token-id prompt (varied in its first token so no two prompts share a prefix) and `ignore_eos` so
every request generates exactly --max-tokens tokens. Reports, per concurrency: aggregate output
tokens/s, TTFT p50/p99 and inter-token latency p50/p99 (every gap between streamed tokens).
Standard library only, so it runs anywhere; the full load generator is `serrano bench` (issue 7).
"""
import argparse, json, statistics, threading, time, urllib.request


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def one(base, model, ids, max_tokens):
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if model:
        body["model"] = model
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    return t0, stamps


def run(base, model, prompt, c, per_stream, max_tokens):
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(k):
        for j in range(per_stream):
            ids = [prompt[0] + 1 + k * per_stream + j] + prompt[1:]
            t0, st = one(base, model, ids, max_tokens)
            with lock:
                if st:
                    ttft.append(st[0] - t0)
                    itl.extend(b - a for a, b in zip(st, st[1:]))
                tokens[0] += len(st)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": c, "requests": c * per_stream, "output_tokens": tokens[0], "wall_s": round(wall, 2),
            "output_tok_s": round(tokens[0] / wall, 1),
            "ttft_p50_ms": round(pct(ttft, 50) * 1e3), "ttft_p99_ms": round(pct(ttft, 99) * 1e3),
            "itl_p50_ms": round(pct(itl, 50) * 1e3, 1), "itl_p99_ms": round(pct(itl, 99) * 1e3, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model")
    ap.add_argument("--label", default="")
    ap.add_argument("--prompt-ids", required=True, help="JSON file with a list of token ids")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    prompt = json.load(open(a.prompt_ids))
    one(a.base_url.rstrip("/"), a.model, prompt, 4)  # warm-up
    for c in a.concurrency:
        r = run(a.base_url.rstrip("/"), a.model, prompt, c, a.requests_per_stream, a.max_tokens)
        r["server"] = a.label
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
