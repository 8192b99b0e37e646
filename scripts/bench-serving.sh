#!/usr/bin/env bash
# Serving throughput, latency, goodput and cost: serrano beside llama.cpp's llama-server on the
# same machine and model, both measured by `serrano bench` with the same workload, interleaved per
# concurrency (serrano, then llama-server, while the other idles).
#
#   scripts/bench-serving.sh [LLAMA_SLOTS=32] [SLO=ttft_p99=10s,tpot_p99=250ms] [USD_PER_HOUR=0.10]
#
# Workload: closed loop at 1, 4, 16 and 32 concurrent streams; 128-token prompts cut to exact
# length with each server's tokenizer (no shared prefix), 128 generated tokens (ignore_eos),
# streamed, completions API; one round of warm-up requests first. Then prompts of 1,040 tokens
# with and without a shared 1,024-token prefix (prefix caching). JSON and HTML reports go to
# target/bench-serving/.
# PEER_BIN=PATH puts that serrano binary (another build, same flags) in llama-server's place: an
# A/B of two builds in one interleaved run. SERRANO_BIN=PATH replaces the build under test.
set -euo pipefail
cd "$(dirname "$0")/.."
slots=${1:-32}; slo=${2:-ttft_p99=10s,tpot_p99=250ms}; price=${3:-0.10}
[ -n "${SERRANO_BIN:-}" ] || cargo build --release -q -p serrano
serrano=${SERRANO_BIN:-target/release/serrano}
peer=${PEER_BIN:+serrano-peer}; peer=${peer:-llama-server}
model=$($serrano models pull 2>/dev/null)
out=target/bench-serving; mkdir -p "$out"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

# Governance stays on (audit, ledger) for a fair cost; the client sends no key, so anonymous.
# The admin key is only for reading /metrics (the KV cache's waste, sampled at 32 streams).
admin=sk-srn-bench-serving-admin-key-0123456789
SERRANO_ADMIN_KEY=$admin $serrano serve --port 18181 --max-num-seqs 32 --allow-anonymous \
  --db "$(mktemp -d)/serrano.db" 2>/dev/null &
spid=$!
if [ -n "${PEER_BIN:-}" ]; then
  SERRANO_ADMIN_KEY=$admin "$PEER_BIN" serve --port 18182 --max-num-seqs 32 --allow-anonymous \
    --db "$(mktemp -d)/serrano.db" 2>/dev/null &
  lpid=$!
else
  # Slots of 1,152 tokens: room for the prefix test's 1,056-token sequences.
  ../shared/peers/llama-server.sh "$model" 18182 -np "$slots" -c $((slots * 1152)) >/dev/null 2>&1 &
fi
wait_up http://127.0.0.1:18181; wait_up http://127.0.0.1:18182
[ -n "${PEER_BIN:-}" ] || lpid=$(pgrep -f "llama-server.*18182" | head -1)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; SLO $slo; \$$price per hour"

bench() { $serrano bench --url http://127.0.0.1:18181/v1 --vs http://127.0.0.1:18182/v1 \
  --endpoint completions --slo "$slo" --price-per-hour "$price" -q "$@"; }
# Samples serrano's KV gauges every 0.5 s until killed: "usage waste" per line.
sample_kv() {
  while sleep 0.5; do
    curl -sf -H "Authorization: Bearer $admin" http://127.0.0.1:18181/metrics |
      awk '/^serrano:kv_cache_usage_perc/ { u = $NF } /^serrano:kv_cache_waste_perc/ { w = $NF }
           END { print u, w }'
  done
}
for c in 1 4 16 32; do
  n=$(( c < 4 ? 8 : 2 * c ))
  [[ $c == 32 ]] && { sample_kv >"$out/kv32.txt" & kvpid=$!; }
  bench --concurrency "$c" --requests "$n" --warmup "$c" --prompt-tokens 128 --output-tokens 128 \
    --json "$out/c$c.json" --html "$out/c$c.html" >"$out/c$c.txt"
done
kill $kvpid 2>/dev/null || true
for shared in 0 1024; do
  bench --concurrency 1 --requests 6 --warmup 1 --prompt-tokens 1040 --shared-prefix "$shared" \
    --output-tokens 16 --json "$out/prefix$shared.json" >"$out/prefix$shared.txt"
done
echo "serrano peak RSS: $(grep VmHWM /proc/$spid/status)"
# Waste = slots of in-use KV blocks that hold no token: weighted by the blocks in use (empty
# slots over used slots, over the run), and at full load (samples within 10% of peak usage;
# the ramp-up and drain, few sequences holding few blocks, have the highest ratios).
awk '$1 > 0 { n++; s[n] = $2; u[n] = $1; su += $1; suw += $1 * $2; if ($1 > peak) peak = $1 }
     END { for (i = 1; i <= n; i++) if (u[i] >= 0.9 * peak) { k++; f += s[i] }
           if (n) printf "serrano KV cache at 32 streams: %d samples, peak usage %.1f%%, waste %.2f%% of used slots, %.2f%% at full load (%d samples)\n", n, 100 * peak, 100 * suw / su, 100 * f / k, k }' "$out/kv32.txt"
echo "$peer peak RSS: $(grep VmHWM /proc/$lpid/status)"

python3 - "$out" "$peer" <<'PY'
import json, sys
out, peer = sys.argv[1], sys.argv[2]
def pair(name): return json.load(open(f"{out}/{name}.json"))
print("| streams | server | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p99 ms | goodput req/s | $/1M output tokens | SLO met |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for c in (1, 4, 16, 32):
    for label, r in zip(("serrano", peer), pair(f"c{c}")):
        cost = r["cost"]["usd_per_1m_output_tokens"] if r["cost"] else float("nan")
        print(f"| {c} | {label} | {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
              f"{r['p50_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | {r['p99_itl_ms']:.0f} | {r['request_goodput']:.2f} | "
              f"{cost:.3f} | {'yes' if r['slo_met'] else 'no'} |")
print()
print("| prefix test (1,040-token prompts, 16 generated) | server | TTFT p50 ms, unique | TTFT p50 ms, shared 1,024 | gain |")
print("| --- | --- | --- | --- | --- |")
u, s = pair("prefix0"), pair("prefix1024")
for label, a, b in zip(("serrano", peer), u, s):
    print(f"| | {label} | {a['p50_ttft_ms']:.0f} | {b['p50_ttft_ms']:.0f} | {a['p50_ttft_ms'] / b['p50_ttft_ms']:.0f}x |")
PY
