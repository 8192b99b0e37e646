#!/bin/bash
# The live sim backend against the simulator (issue 33, item 5; BENCHMARKS.md, "A simulated
# device behind the API"):
#   scripts/sim-validate-live.sh [BINARY] [OUT_DIR]     (about 6 minutes on 2 vCPUs)
# `serrano serve` with a `kind = "sim"` backend: a catalog device (this machine's own roofline
# entry, `cpu-2vcpu-epyc`, running the default model) stepping on the wall clock. Each case is
# one seeded trace replayed by `serrano bench --trace` against that server and by `serrano sim
# run --device --trace` on the virtual clock with the same step limits: the same scheduler and
# device model, so the difference is what the live path adds (HTTP, the pipeline, the
# device's thread waking on time, the load generator on the same 2 vCPUs). Synthetic tokens
# (no model runs) unless the case says engine (the model's own tokens, each released no sooner
# than the device would have it). Prefix caching is off (the device follows the server's
# --no-prefix-caching): the load generator's prompts for the same request index repeat across
# cases, which a cache would serve and the trace replay does not model. Prints the markdown table.
set -euo pipefail
B=${1:-target/release/serrano}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/sim-lib.sh
. "$HERE/scripts/sim-lib.sh"
DEVICE=cpu-2vcpu-epyc
SEQS=32
TOKENS=256
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$DIR"' EXIT
start() { # PORT TOKENS
  printf '[[backend]]\nname = "sim"\nkind = "sim"\nregion = "here"\ntier = "sim"\nmax_concurrency = 1024\nsim = { device = "%s", max_num_seqs = %s, max_batch_tokens = %s, tokens = "%s" }\n' \
    "$DEVICE" "$SEQS" "$TOKENS" "$2" >"$DIR/$2.toml"
  $B serve --port "$1" --allow-anonymous --no-prefix-caching --config "$DIR/$2.toml" --db "$DIR/$2.db" 2>"$DIR/$2.log" &
  PIDS+=($!)
  wait_up "$1"
}


plain="$DIR/plain.toml"
printf 'name = "live"\nendpoint = "completions"\nstream = true\nrequests = 1\nwarmup_requests = 0\nprompt_tokens = { dist = "fixed", value = 64 }\noutput_tokens = { dist = "fixed", value = 64 }\narrival = { kind = "poisson", rate = 1.0 }\n' >"$plain"

start 18841 synthetic
start 18842 engine
cases=(
  "poisson-1|18841|120 1.0 1.0 64 512 64"
  "poisson-3|18841|150 3.0 1.0 64 256 64"
  "gamma-cv2|18841|120 2.0 2.0 64 256 64"
  "engine-poisson-1|18842|80 1.0 1.0 64 256 64"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name port args <<<"$c"
  echo "== $name" >&2
  # shellcheck disable=SC2086
  trace "$OUT/$name.jsonl" $args
  $B bench --url "http://127.0.0.1:$port/v1" --workload "$plain" --trace "$OUT/$name.jsonl" \
    --json "$OUT/$name.measured.json" >/dev/null
  $B sim run --workload "$plain" --trace "$OUT/$name.jsonl" --device "$DEVICE" \
    --max-num-seqs $SEQS --max-batch-tokens $TOKENS --json "$OUT/$name.sim.json" >/dev/null
done
python3 "$HERE/scripts/sim-table.py" "$OUT" poisson-1 poisson-3 gamma-cv2 engine-poisson-1
