#!/bin/bash
# Stall-free steps, A against B on one binary (BENCHMARKS.md, "Stall-free steps"):
#   scripts/bench-slo.sh [BINARY]     (default target/release/serrano)
# A serves with the prefill cap off (--itl-target-ms 0), B with the default; both with prefix
# caching off. Runs the 32-stream comparison (A B A B), then a sweep of the bursty chat workload
# on each at TTFT p99 2 s, TPOT p99 100 ms, ITL p99 150 ms. B's step log goes to
# /tmp/steps-b.jsonl, sweeps' JSON to /tmp/sweep-PORT.json. About 40 minutes on 2 vCPUs.
set -euo pipefail
B=${1:-target/release/serrano}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export SERRANO_ADMIN_KEY=${SERRANO_ADMIN_KEY:-sk-bench-slo-admin-0123456789abcdef0123}
DIR=$(mktemp -d)
$B serve --port 18811 --allow-anonymous --no-prefix-caching --itl-target-ms 0 --db "$DIR/a.db" 2>"$DIR/a.log" &
A_PID=$!
$B serve --port 18812 --allow-anonymous --no-prefix-caching --step-log /tmp/steps-b.jsonl --db "$DIR/b.db" 2>"$DIR/b.log" &
B_PID=$!
trap 'kill $A_PID $B_PID 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 8
echo "== 32 streams, A = --itl-target-ms 0, B = default (100)"
$B bench --url http://127.0.0.1:18811/v1 --vs http://127.0.0.1:18812/v1 --rounds 2 --endpoint chat \
  --concurrency 32 --requests 160 --warmup 32 --prompt-tokens 256 --output-tokens 128
for port in 18811 18812; do
  echo "== sweep of the bursty chat workload on $port"
  $B bench --url http://127.0.0.1:$port/v1 --workload "$HERE/bench/workloads/bursty-chat.toml" \
    --sweep --slo ttft_p99=2s,tpot_p99=100ms,itl_p99=150ms --json /tmp/sweep-$port.json
done
