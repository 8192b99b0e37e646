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
