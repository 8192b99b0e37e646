#!/usr/bin/env bash
# A/B of two serrano builds at one concurrency: both serve the default model side by side (one
# idles while the other is measured), and `serrano bench --vs` runs three rounds, each in both
# orders, so drift of a shared VM shows up as spread rather than as a difference.
#
#   scripts/bench-ab.sh NEW_BIN OLD_BIN [CONCURRENCY=16]
#
# Workload: 128-token prompts, 128 generated tokens, completions API, streamed, 2 x CONCURRENCY
# requests after CONCURRENCY warm-up requests. Prints output tokens/s and TPOT p50 per run.
set -euo pipefail
new=$1; old=$2; c=${3:-16}
admin=sk-srn-bench-ab-admin-key-0123456789abcdef
for port_bin in "18181 $new" "18182 $old"; do
  set -- $port_bin
  SERRANO_ADMIN_KEY=$admin "$2" serve --port "$1" --max-num-seqs 32 --allow-anonymous \
    --db "$(mktemp -d)/serrano.db" 2>/dev/null &
done
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for port in 18181 18182; do
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
done
json=$(mktemp)
for round in 1 2 3; do
  for pair in "18181 18182" "18182 18181"; do
    set -- $pair
    "$new" bench --url "http://127.0.0.1:$1/v1" --vs "http://127.0.0.1:$2/v1" --endpoint completions \
      -q --concurrency "$c" --requests $((2 * c)) --warmup "$c" --prompt-tokens 128 \
      --output-tokens 128 --json "$json" >/dev/null
    python3 - "$json" "$round" "$1" "$2" <<'PY'
import json, sys
path, round_, a, b = sys.argv[1:]
name = {"18181": "new", "18182": "old"}
runs = json.load(open(path))
print(f"round {round_}", "  ".join(
    f"{name[p]} {r['output_throughput']:.1f} tok/s TPOT p50 {r['p50_tpot_ms']:.1f} ms"
    for p, r in zip((a, b), runs)))
PY
  done
done
