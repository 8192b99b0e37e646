#!/bin/bash
# The simulator's fleet check (issue 33; BENCHMARKS.md, "The simulator's fleet check"):
#   scripts/sim-validate-fleet.sh [BINARY] [OUT_DIR]     (about 7 minutes on 2 vCPUs)
# Two real `serrano serve` nodes on the default model, `--threads 1` each, pinned to one core
# each (taskset: node A on CPU 0, node B on CPU 1), behind `serrano gateway` (least-loaded
# routing), against the simulated fleet of two: a fleet file whose backends are the two nodes'
# own calibrated profiles (`sim = { profile = FILE }`) behind the router's same strategy.
# Each node is calibrated alone, as `scripts/sim-validate.sh` calibrates one server (two
# seeded Poisson traces, then `serrano sim calibrate`); the fleet cases are seeded traces
# replayed by `serrano bench --trace` through the gateway and by `serrano sim run --fleet
# --trace`. The gateway and the load generator are not pinned: this machine has two cores
# and each holds a node, so they take their CPU from the nodes; the script measures how much
# (their user + system seconds over the run, from /proc and the shell's `time`) and prints it
# beside the table.
set -euo pipefail
B=${1:-target/release/serrano}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/sim-lib.sh
. "$HERE/scripts/sim-lib.sh"
A_PORT=18841
B_PORT=18842
GW_PORT=18843
node() { # CPU PORT NAME
  taskset -c "$1" "$B" serve --port "$2" --threads 1 --allow-anonymous --no-prefix-caching \
    --served-model-name smollm2 --db "$DIR/$3.db" 2>"$DIR/$3.log" &
}
node 0 $A_PORT a
A_PID=$!
node 1 $B_PORT b
B_PID=$!
trap 'kill $A_PID $B_PID ${G_PID:-} 2>/dev/null || true; rm -rf "$DIR"' EXIT
wait_up $A_PORT
wait_up $B_PORT

plain="$DIR/plain.toml"
printf 'name = "fleet validation"\nendpoint = "completions"\nstream = true\nrequests = 1\nwarmup_requests = 0\nprompt_tokens = { dist = "fixed", value = 64 }\noutput_tokens = { dist = "fixed", value = 64 }\narrival = { kind = "poisson", rate = 1.0 }\n' >"$plain"
measure() { # URL TRACE OUT [BENCH ARGS...]
  $B bench --url "$1" --workload "$plain" --trace "$2" --json "$3" "${@:4}" >/dev/null \
    2>>"$DIR/bench.log"
}

# One core runs about half the 2-thread server's rates (scripts/sim-validate.sh: 1 and 3
# req/s), so each node is calibrated at 0.5 and 1.5 req/s; both nodes at once, each with its
# own trace.
echo "== calibration of each node: Poisson 0.5 req/s with prompts 64-512, 1.5 req/s with 64-256" >&2
trace "$OUT/cal-a1.jsonl" 60 0.5 1.0 64 512 64
trace "$OUT/cal-b1.jsonl" 60 0.5 1.0 64 512 64
trace "$OUT/cal-a3.jsonl" 90 1.5 1.0 64 256 64
trace "$OUT/cal-b3.jsonl" 90 1.5 1.0 64 256 64
for load in 1 3; do
  measure "http://127.0.0.1:$A_PORT/v1" "$OUT/cal-a$load.jsonl" "$OUT/cal-a$load.json" &
  other=$!
  measure "http://127.0.0.1:$B_PORT/v1" "$OUT/cal-b$load.jsonl" "$OUT/cal-b$load.json"
  wait $other
done
$B sim calibrate --url "http://127.0.0.1:$A_PORT" --out "$OUT/node-a.toml"
$B sim calibrate --url "http://127.0.0.1:$B_PORT" --out "$OUT/node-b.toml"

backends() { # a line per node: KEY VALUE-A VALUE-B
  for n in a b; do
    if [ "$n" = a ]; then v=$2; else v=$3; fi
    printf '\n[[backend]]\nname = "node-%s"\nregion = "local"\ntier = "cpu"\nmodels = ["smollm2"]\n%s = %s\n' "$n" "$1" "$v"
  done
}
{
  printf '[routing]\nstrategy = "least-loaded"\n'
  backends url "\"http://127.0.0.1:$A_PORT/v1\"" "\"http://127.0.0.1:$B_PORT/v1\""
} >"$OUT/gateway.toml"
{
  printf '[routing]\nstrategy = "least-loaded"\n'
  backends sim '{ profile = "node-a.toml" }' '{ profile = "node-b.toml" }'
} >"$OUT/fleet.toml"
$B gateway --port $GW_PORT --config "$OUT/gateway.toml" --allow-anonymous --db "$DIR/gw.db" \
  2>"$DIR/gw.log" &
G_PID=$!
wait_up $GW_PORT

cpu() { # user + system seconds of a running process
  awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"
}
# Held out: NAME then the trace's arguments. Twice a node's calibration rates, in all.
cases=(
  "fleet-poisson|160 2.0 1.0 64 256 64"
  "fleet-gamma-cv2|160 2.0 2.0 64 256 64"
)
: >"$OUT/cpu.txt"
for c in "${cases[@]}"; do
  IFS='|' read -r name args <<<"$c"
  echo "== $name" >&2
  # shellcheck disable=SC2086
  trace "$OUT/$name.jsonl" $args
  g0=$(cpu $G_PID) a0=$(cpu $A_PID) b0=$(cpu $B_PID) t0=$(date +%s.%N)
  TIMEFORMAT='%U %S'
  # The gateway has no /tokenize: node A makes the exact-length prompts (the same model).
  { time measure "http://127.0.0.1:$GW_PORT/v1" "$OUT/$name.jsonl" "$OUT/$name.measured.json" \
    --tokenizer-url "http://127.0.0.1:$A_PORT/v1"; } 2>"$DIR/time.txt"
  t1=$(date +%s.%N)
  echo "$name $(cat "$DIR/time.txt") $(cpu $G_PID) $g0 $(cpu $A_PID) $a0 $(cpu $B_PID) $b0 $t0 $t1" \
    >>"$OUT/cpu.txt"
  $B sim run --workload "$plain" --trace "$OUT/$name.jsonl" --fleet "$OUT/fleet.toml" \
    --json "$OUT/$name.sim.json" >"$OUT/$name.sim.txt"
done

python3 "$HERE/scripts/sim-table.py" "$OUT" fleet-poisson fleet-gamma-cv2
python3 - "$OUT" <<'PY'
import os, sys
out = sys.argv[1]
cpu = {l.split()[0]: [float(x) for x in l.split()[1:]] for l in open(os.path.join(out, "cpu.txt"))}
print("\nCPU over each measured run (seconds of one core; share of the run's wall time):")
for name, (bu, bs, g1, g0, a1, a0, b1, b0, t0, t1) in cpu.items():
    wall = t1 - t0
    parts = [("load generator", bu + bs), ("gateway", g1 - g0), ("node A", a1 - a0), ("node B", b1 - b0)]
    print(f"- {name} ({wall:.0f} s): " + ", ".join(f"{k} {v:.1f} s ({v / wall * 100:.0f}%)" for k, v in parts))
for n in ("a", "b"):
    print(f"\nnode {n.upper()}'s profile:\n" + open(os.path.join(out, f"node-{n}.toml")).read())
PY
