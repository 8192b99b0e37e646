#!/bin/bash
# The simulator's validation table (issue 33; BENCHMARKS.md, "The simulator's validation"):
#   scripts/sim-validate.sh [BINARY] [OUT_DIR]     (about 15 minutes on 2 vCPUs)
# Calibrates on this machine's engine with the default model at two loads (`serrano sim
# calibrate`: the engine's own step-time model, read from /metrics after those runs), then
# predicts loads and shapes held out from calibration: another rate, bursty gamma arrivals,
# long prompts, two tenants, and prefix sharing. Each case is one seeded trace, replayed by
# `serrano bench --trace` against the server and by `serrano sim run --profile --trace` on the
# calibrated model, so both see exactly the same requests. Prints the markdown table.
# The server runs with 2 threads and the load generator beside it; both share this machine's 2
# vCPUs (the load generator's CPU is in the measured latency, as a client's would be).
set -euo pipefail
B=${1:-target/release/serrano}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/sim-lib.sh
. "$HERE/scripts/sim-lib.sh"
PORT=18831
PREFIX_PORT=18832
# Calibration and every case but prefix sharing run without prefix caching (as the calibration
# sweeps of the bench issues do); prefix sharing gets a server with it on.
$B serve --port $PORT --allow-anonymous --no-prefix-caching --db "$DIR/a.db" 2>"$DIR/a.log" &
A_PID=$!
trap 'kill $A_PID ${P_PID:-} 2>/dev/null || true; rm -rf "$DIR"' EXIT
wait_up $PORT

# A seeded trace of tenants (this script's own, not sim-lib.sh's single-tenant one): NAME N
# RATE CV TENANTS... where each tenant is name:weight:pmin:pmax:out.
trace() {
  python3 - "$@" <<'PY'
import json, os, random, sys, zlib
name, n, rate, cv = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
tenants = [t.split(":") for t in sys.argv[5:]]
rng = random.Random(zlib.crc32(os.path.basename(name).encode()))
shape = 1.0 / (cv * cv)
t = 0.0
with open(name, "w") as f:
    for _ in range(n):
        ten = rng.choices(tenants, weights=[float(x[1]) for x in tenants])[0]
        e = {"time": round(t, 4), "prompt_tokens": rng.randint(int(ten[2]), int(ten[3])),
             "output_tokens": int(ten[4])}
        if ten[0] != "-":
            e["tenant"] = ten[0]
        f.write(json.dumps(e) + "\n")
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
PY
}

plain="$DIR/plain.toml"
printf 'name = "validation"\nendpoint = "completions"\nstream = true\nrequests = 1\nwarmup_requests = 0\nprompt_tokens = { dist = "fixed", value = 64 }\noutput_tokens = { dist = "fixed", value = 64 }\narrival = { kind = "poisson", rate = 1.0 }\n' >"$plain"
tenants="$DIR/tenants.toml"
sed 's/^name = .*/name = "two tenants"/' "$plain" >"$tenants"
printf '\n[[tenants]]\nname = "chat"\nweight = 0.7\n\n[[tenants]]\nname = "docs"\nweight = 0.3\n' >>"$tenants"
prefix="$DIR/prefix.toml"
sed 's/^name = .*/name = "prefix sharing"/' "$plain" >"$prefix"
echo 'shared_prefix_tokens = 192' >>"$prefix"

measure() { # PORT WORKLOAD TRACE OUT
  $B bench --url "http://127.0.0.1:$1/v1" --workload "$2" --trace "$3" --json "$4" >/dev/null
}

echo "== calibration: Poisson 1 req/s with prompts 64-512, 3 req/s with prompts 64-256; 64 output tokens" >&2
trace "$OUT/cal1.jsonl" 80 1.0 1.0 -:1:64:512:64
trace "$OUT/cal3.jsonl" 120 3.0 1.0 -:1:64:256:64
measure $PORT "$plain" "$OUT/cal1.jsonl" "$OUT/cal1.json"
measure $PORT "$plain" "$OUT/cal3.jsonl" "$OUT/cal3.json"
$B sim calibrate --url "http://127.0.0.1:$PORT" --out "$OUT/profile.toml"

# Held out: NAME WORKLOAD PORT then the trace's arguments.
cases=(
  "rate-2|$plain|$PORT|120 2.0 1.0 -:1:64:256:64"
  "gamma-cv2|$plain|$PORT|120 1.5 2.0 -:1:64:256:64"
  "long-prompts|$plain|$PORT|60 0.4 1.0 -:1:768:1024:64"
  "two-tenants|$tenants|$PORT|120 1.5 1.0 chat:0.7:32:128:128 docs:0.3:384:768:32"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name w port args <<<"$c"
  echo "== $name" >&2
  # shellcheck disable=SC2086
  trace "$OUT/$name.jsonl" $args
  measure "$port" "$w" "$OUT/$name.jsonl" "$OUT/$name.measured.json"
  $B sim run --workload "$w" --trace "$OUT/$name.jsonl" --profile "$OUT/profile.toml" \
    --json "$OUT/$name.sim.json" >/dev/null
done

echo "== prefix-sharing (a server with prefix caching on, calibrated the same way)" >&2
$B serve --port $PREFIX_PORT --allow-anonymous --db "$DIR/p.db" 2>"$DIR/p.log" &
P_PID=$!
wait_up $PREFIX_PORT
trace "$OUT/prefix-sharing.jsonl" 120 2.0 1.0 -:1:256:320:64
measure $PREFIX_PORT "$prefix" "$OUT/prefix-sharing.jsonl" "$OUT/prefix-sharing.measured.json"
$B sim run --workload "$prefix" --trace "$OUT/prefix-sharing.jsonl" --profile "$OUT/profile.toml" \
  --json "$OUT/prefix-sharing.sim.json" >/dev/null

python3 "$HERE/scripts/sim-table.py" "$OUT" rate-2 gamma-cv2 long-prompts two-tenants prefix-sharing
