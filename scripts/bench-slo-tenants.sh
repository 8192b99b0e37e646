#!/usr/bin/env bash
# Goodput of two tenants at their SLOs, serrano beside llama-server on the same machine and model
# (BENCHMARKS.md, "Two tenants at their SLOs"):
#   scripts/bench-slo-tenants.sh [BINARY] [USD_PER_HOUR=0.10]
# Workload bench/workloads/two-tenant-bursty.toml: interactive `web` (short chat prompts, its own
# SLO: TTFT p99 2 s, TPOT p99 100 ms, ITL p99 150 ms) and `evals` (long prompts and outputs, each
# answered within 10 minutes), gamma arrivals cv 2. `serrano bench --sweep` finds the highest
# rate at which both tenants meet their SLOs on each server, one server at a time (the other
# stopped). serrano runs with its defaults, prefix caching off and `evals` in the batch class;
# llama-server with 32 slots and its prompt cache on (its default). JSON in target/bench-slo/.
# About 30-40 minutes on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/serrano}; price=${2:-0.10}
W=bench/workloads/two-tenant-bursty.toml
out=target/bench-slo; mkdir -p "$out"
model=$($B models pull 2>/dev/null)
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
sweep() {
  $B bench --url "$1/v1" --workload "$W" --sweep --sweep-steps 2 --price-per-hour "$price" \
    --json "$out/$2.json" -q
}

export SERRANO_ADMIN_KEY=${SERRANO_ADMIN_KEY:-sk-bench-slo-tenants-admin-0123456789ab}
printf '[[backend]]\nname = "local"\nkind = "local"\nregion = "here"\ntier = "cpu"\n\n[tenant.evals]\nclass = "batch"\n' > "$DIR/routing.toml"
$B serve --port 18831 --no-prefix-caching --config "$DIR/routing.toml" --db "$DIR/db" 2>"$DIR/log" &
S=$!
wait_up http://127.0.0.1:18831
key() {
  curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" -H 'content-type: application/json' \
    -d "{\"name\": \"$1\"}" http://127.0.0.1:18831/admin/v1/tenants >/dev/null
  curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" -H 'content-type: application/json' \
    -d "{\"tenant\": \"$1\"}" http://127.0.0.1:18831/admin/v1/keys | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}
WEB_KEY=$(key web) EVALS_KEY=$(key evals)
# The bench's own key (model listing, prompt lengths) is web's.
SERRANO_API_KEY=$WEB_KEY
export WEB_KEY EVALS_KEY SERRANO_API_KEY
echo "== serrano $($B --version 2>/dev/null | head -1)"
sweep http://127.0.0.1:18831 serrano
kill $S; wait $S 2>/dev/null || true

# llama-server reads no keys; slots of 1,600 tokens hold the longest request (1,024 + 512).
../shared/peers/llama-server.sh "$model" 18832 -np 32 -c $((32 * 1600)) >"$DIR/llama.log" 2>&1 &
wait_up http://127.0.0.1:18832 || { tail "$DIR/llama.log"; exit 1; }
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18832/v1/models >/dev/null && break; sleep 0.2; done
echo "== llama-server -np 32"
sweep http://127.0.0.1:18832 llama-server
