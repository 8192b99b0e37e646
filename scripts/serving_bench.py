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
            ids = [prompt[0] + 1 + k * per_stream + j] + prompt[1:128]
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


def prefix_test(base, model, ids, n_prefix, label, reps=6):
    """TTFT for prompts that share an n_prefix-token prefix (then 16 own tokens) versus prompts
    that differ from their first token: the gain a prefix cache gives a repeated system prompt."""
    res = {}
    for mode in ("unique", "shared"):
        ttfts = []
        for j in range(reps):
            tail = [ids[n_prefix + (k + j) % 16] for k in range(16)]
            head = list(ids[:n_prefix])
            if mode == "unique":
                head[0] = ids[0] + 1000 + j
            t0, st = one(base, model, head + tail, 16)
            ttfts.append(st[0] - t0)
        res[mode] = statistics.median(ttfts[1:])  # the first shared request fills the cache
    print(json.dumps({"server": label, "shared_prefix_tokens": n_prefix, "ttft_p50_ms_unique": round(res["unique"] * 1e3),
                      "ttft_p50_ms_shared": round(res["shared"] * 1e3), "gain": round(res["unique"] / res["shared"], 2)}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model")
    ap.add_argument("--label", default="")
    ap.add_argument("--prompt-ids", required=True, help="JSON file with a list of token ids")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prefix-test", type=int, default=0, metavar="N", help="instead: TTFT with and without a shared N-token prefix")
    a = ap.parse_args()
    prompt = json.load(open(a.prompt_ids))
    one(a.base_url.rstrip("/"), a.model, prompt[:128], 4)  # warm-up
    if a.prefix_test:
        prefix_test(a.base_url.rstrip("/"), a.model, prompt, a.prefix_test, a.label)
        return
    for c in a.concurrency:
        r = run(a.base_url.rstrip("/"), a.model, prompt, c, a.requests_per_stream, a.max_tokens)
        r["server"] = a.label
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
