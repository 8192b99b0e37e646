#!/bin/bash
# Latency classes under a batch flood (BENCHMARKS.md, "Stall-free steps"):
#   scripts/bench-slo-flood.sh [BINARY]     (default target/release/serrano)
# One server (prefix caching off) with tenants `web` (interactive), `evals` (class batch) and
# `evals-unclassed` (interactive, as every tenant was before classes). The interactive tenant
# sends 0.5 req/s of 128-token prompts and 64-token answers: alone, then beside a flood ten
# times its rate of 512/128 requests from `evals`, then from `evals-unclassed`.
set -euo pipefail
B=${1:-target/release/serrano}
export SERRANO_ADMIN_KEY=${SERRANO_ADMIN_KEY:-sk-bench-flood-admin-0123456789abcdef012}
DIR=$(mktemp -d)
printf '[[backend]]\nname = "local"\nkind = "local"\nregion = "here"\ntier = "cpu"\n\n[tenant.evals]\nclass = "batch"\n' > "$DIR/routing.toml"
$B serve --port 18821 --no-prefix-caching --config "$DIR/routing.toml" --db "$DIR/db" 2>"$DIR/log" &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 8
URL=http://127.0.0.1:18821
key() {
  curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" -H 'content-type: application/json' \
    -d "{\"name\": \"$1\"}" $URL/admin/v1/tenants >/dev/null
  curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" -H 'content-type: application/json' \
    -d "{\"tenant\": \"$1\"}" $URL/admin/v1/keys | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}
export WEB_KEY=$(key web) EVALS_KEY=$(key evals) UNCLASSED_KEY=$(key evals-unclassed)
web() {
  $B bench --url $URL/v1 --api-key-env WEB_KEY --rate 0.5 --arrival poisson --requests 60 \
    --warmup 2 --prompt-tokens 128 --output-tokens 64 --seed "$1"
}
flood() {
  $B bench --url $URL/v1 --api-key-env "$1" --rate 5 --arrival poisson --requests 2000 \
    --duration "$2" --prompt-tokens 512 --output-tokens 128 --seed 9 >/dev/null 2>&1 || true
}
echo "== interactive alone"
web 1
echo "== beside a batch flood (tenant class batch)"
flood EVALS_KEY 150 & F=$!
sleep 20; web 2; kill $F 2>/dev/null || true; wait $F 2>/dev/null || true
sleep 30
echo "== beside the same flood from an unclassed (interactive) tenant"
flood UNCLASSED_KEY 150 & F=$!
sleep 20; web 3; kill $F 2>/dev/null || true; wait $F 2>/dev/null || true
