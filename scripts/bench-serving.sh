#!/usr/bin/env bash
# Aggregate serving throughput and latency: serrano beside llama.cpp's llama-server, same machine,
# same model, same fixed workload (128-token prompts, 128 generated tokens, closed loop at
# 1/4/16/32 concurrent streams), servers run one after the other in the same invocation.
#
#   scripts/bench-serving.sh [LLAMA_SLOTS=32] [REQUESTS_PER_STREAM=2]
set -euo pipefail
cd "$(dirname "$0")/.."
slots=${1:-32}; per=${2:-2}
cargo build --release -q -p serrano
serrano=target/release/serrano
model=$($serrano models pull 2>/dev/null)
ids=$(mktemp); trap 'rm -f $ids; kill $(jobs -p) 2>/dev/null || true' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

# Governance stays on (audit, ledger) for a fair cost; the client sends no key, so anonymous.
$serrano serve --port 18181 --max-num-seqs 32 --allow-anonymous --db "$(mktemp -d)/serrano.db" 2>/dev/null & pid=$!
wait_up http://127.0.0.1:18181
curl -s http://127.0.0.1:18181/v1/completions -H 'Content-Type: application/json' -d '{"prompt":"Once upon a time","max_tokens":1}' >/dev/null
python3 - "$ids" <<'PY'
import json, sys, urllib.request
text = "The history of lighthouses begins with fires lit on hilltops to guide ships at night. " * 80
req = urllib.request.Request("http://127.0.0.1:18181/tokenize", data=json.dumps({"prompt": text, "add_special_tokens": False}).encode(), headers={"Content-Type": "application/json"})
json.dump(json.load(urllib.request.urlopen(req))["tokens"][:1100], open(sys.argv[1], "w"))
PY
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
python3 scripts/serving_bench.py --base-url http://127.0.0.1:18181 --prompt-ids "$ids" --label serrano --requests-per-stream "$per"
python3 scripts/serving_bench.py --base-url http://127.0.0.1:18181 --prompt-ids "$ids" --label serrano --prefix-test 1024
echo "serrano peak RSS: $(grep VmHWM /proc/$pid/status)"
kill $pid; wait $pid 2>/dev/null || true

../shared/peers/llama-server.sh "$model" 18182 -np "$slots" -c $((slots * 256)) >/dev/null 2>&1 & 
wait_up http://127.0.0.1:18182
lpid=$(pgrep -f "llama-server.*18182" | head -1)
python3 scripts/serving_bench.py --base-url http://127.0.0.1:18182 --prompt-ids "$ids" --label "llama-server -np $slots" --requests-per-stream "$per"
echo "llama-server peak RSS: $(grep VmHWM /proc/$lpid/status)"
kill $lpid; wait 2>/dev/null || true
# The prefix test needs a slot that holds 1,040 tokens: one slot, 4,096 context (llama-server
# reuses a slot's cached prompt prefix by default).
../shared/peers/llama-server.sh "$model" 18183 -np 1 -c 4096 >/dev/null 2>&1 &
wait_up http://127.0.0.1:18183
python3 scripts/serving_bench.py --base-url http://127.0.0.1:18183 --prompt-ids "$ids" --label "llama-server -np 1" --prefix-test 1024
