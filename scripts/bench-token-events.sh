#!/usr/bin/env bash
# What per-token trace events cost decode (BENCHMARKS.md, "Traces"): two `serrano serve`s on the
# default model, both exporting sampled traces over OTLP/HTTP to the test suite's receiver; one
# with `trace_tokens = true` for the tenant the bench's key belongs to, one without. `serrano
# bench --vs` alternates them, three rounds in both orders, at one stream and at 16.
#   scripts/bench-token-events.sh [BINARY=target/release/serrano]
# Needs the receiver's venv (target/otelenv, made by .ci/run or the traces test).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/serrano}
tmp=$(mktemp -d)
pids=()
trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$tmp"' EXIT
wait_up() { for _ in $(seq 1 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }
target/otelenv/bin/python crates/serrano/tests/otlp_receiver.py --http-port 18269 --out "$tmp/spans.jsonl" >/dev/null & pids+=($!)
export SERRANO_ADMIN_KEY=sk-srn-bench-admin-key-0123456789abcdef
local_backend='[[backend]]\nname = "local"\nkind = "local"\nregion = "here"\ntier = "cpu"\n'
printf "$local_backend" > "$tmp/off.toml"
printf "$local_backend\n[tenant.admin]\ntrace_tokens = true\n" > "$tmp/on.toml"
for side in "18261 off" "18262 on"; do
  set -- $side
  $bin serve --port "$1" --config "$tmp/$2.toml" --db "$tmp/$2.db" \
    --otlp-endpoint http://127.0.0.1:18269 2>"$tmp/$2.log" & pids+=($!)
  wait_up "http://127.0.0.1:$1/health"
done
for c in 1 16; do
  for round in 1 2 3; do
    for pair in "18261 18262" "18262 18261"; do
      set -- $pair
      $bin bench --url "http://127.0.0.1:$1/v1" --vs "http://127.0.0.1:$2/v1" --endpoint completions \
        --api-key-env SERRANO_ADMIN_KEY --vs-api-key-env SERRANO_ADMIN_KEY -q --concurrency "$c" \
        --requests $((4 * c)) --warmup "$c" --prompt-tokens 64 --output-tokens 128 --json "$tmp/r.json" >/dev/null
      python3 - "$tmp/r.json" "$c" "$1" "$2" <<'PY'
import json, sys
path, c, a, b = sys.argv[1:]
name = {"18261": "events off", "18262": "events on"}
runs = json.load(open(path))
print(f"streams {c}", "  ".join(
    f"{name[p]}: {r['output_throughput']:.1f} tok/s, TPOT p50 {r['p50_tpot_ms']:.2f} ms" for p, r in zip((a, b), runs)))
PY
    done
  done
done
echo "token events received: $(grep -o '"serrano.token"' "$tmp/spans.jsonl" | wc -l)"
