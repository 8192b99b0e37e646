#!/usr/bin/env bash
# Single-stream decode and prefill speed: serrano beside llama.cpp, same machine, same model,
# same thread count, interleaved A B A B so drift in machine load hits both.
#
#   scripts/bench-baseline.sh [ROUNDS=3] [THREADS=2]
#
# llama.cpp is built (once, cached) by ../shared/peers/llama-server.sh; its llama-bench is used.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; threads=${2:-2}
cargo build --release -q -p serrano
serrano=target/release/serrano
model=$($serrano models pull 2>/dev/null)
cache=${SERRANO_PEERS_CACHE:-$HOME/.cache/serrano-peers}
bench=$cache/llama.cpp-0.3.36/build/bin/llama-bench
if [[ ! -x $bench ]]; then
  # The peer script builds llama-server and llama-bench, then starts the server: stop it once built.
  ../shared/peers/llama-server.sh "$model" 18999 & pid=$!
  until [[ -x $bench ]] || ! kill -0 $pid 2>/dev/null; do sleep 5; done
  sleep 2; kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
fi
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads used: $threads"
for r in $(seq 1 "$rounds"); do
  echo "== round $r"
  echo "-- llama.cpp tg128 / pp512"
  "$bench" -m "$model" -t "$threads" -p 0 -n 128 -r 3 -o md 2>/dev/null | grep -E 'tg128'
  "$bench" -m "$model" -t "$threads" -p 512 -n 0 -r 3 -o md 2>/dev/null | grep -E 'pp512'
  echo "-- serrano decode (128 new tokens after an 8-token prompt) / prefill (512-token prompt)"
  "$serrano" generate -q --threads "$threads" --prompt-tokens 8 -n 128 --ignore-eos --repeat 3 2>/dev/null | tail -n 2
  "$serrano" generate -q --threads "$threads" --prompt-tokens 512 -n 1 --repeat 3 2>/dev/null | tail -n 2
done

# The same two numbers over HTTP, from servers, both measured by one client (`serrano bench`,
# rounds alternating A B A B): decode tok/s = 1000 / mean TPOT (ms) of 128-token outputs after
# 8-token prompts; prefill tok/s = 512 / mean TTFT (s) of 512-token prompts. Prefix caching is off
# in serrano, and prompts are cut from varying offsets, so neither server reuses a prompt.
echo "== over HTTP: serrano serve vs llama-server -np 1, measured by serrano bench"
out=target/bench-baseline; mkdir -p "$out"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
"$serrano" serve --port 18191 --threads "$threads" --no-prefix-caching --allow-anonymous \
  --db "$(mktemp -d)/serrano.db" 2>/dev/null &
../shared/peers/llama-server.sh "$model" 18192 -np 1 -c 2048 -t "$threads" >/dev/null 2>&1 &
wait_up http://127.0.0.1:18191; wait_up http://127.0.0.1:18192
http_bench() { "$serrano" bench --url http://127.0.0.1:18191/v1 --vs http://127.0.0.1:18192/v1 \
  --endpoint completions --concurrency 1 --rounds "$rounds" -q "$@" >/dev/null; }
http_bench --requests 3 --warmup 1 --prompt-tokens 8 --output-tokens 128 --json "$out/decode.json"
http_bench --requests 3 --warmup 1 --prompt-tokens 512 --output-tokens 1 --json "$out/prefill.json"
python3 - "$out" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/decode.json")); p = json.load(open(f"{sys.argv[1]}/prefill.json"))
for label, a, b in zip(("serrano", "llama-server"), d, p):
    print(f"{label}: decode {1000 / a['mean_tpot_ms']:.1f} tok/s (TPOT mean {a['mean_tpot_ms']:.2f} ms), "
          f"prefill 512 {512 / (b['mean_ttft_ms'] / 1000):.1f} tok/s (TTFT mean {b['mean_ttft_ms']:.0f} ms)")
print(f"serrano / llama-server: decode {d[1]['mean_tpot_ms'] / d[0]['mean_tpot_ms']:.2f}x, "
      f"prefill {p[1]['mean_ttft_ms'] / p[0]['mean_ttft_ms']:.2f}x")
PY
