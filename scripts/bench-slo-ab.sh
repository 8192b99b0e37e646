#!/usr/bin/env bash
# The highest rate two serrano builds sustain within an SLO on the bursty chat workload
# (issue 30's goodput target): both serve the default model side by side with prefix caching
# off (one idles while the other is measured), and `serrano bench --sweep` (NEW's load
# generator for both) doubles the rate until the SLO breaks, then bisects.
#
#   scripts/bench-slo-ab.sh NEW_BIN OLD_BIN [SLO=ttft_p99=2s,tpot_p99=100ms]
#
# Prints each build's sweep (offered and served rate, TTFT and TPOT p99, SLO met). About 8-10
# minutes per build on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
new=$1; old=$2; slo=${3:-ttft_p99=2s,tpot_p99=100ms}
admin=sk-srn-bench-slo-ab-admin-key-0123456789abcdef
for port_bin in "18183 $new" "18184 $old"; do
  set -- $port_bin
  SERRANO_ADMIN_KEY=$admin "$2" serve --port "$1" --no-prefix-caching --allow-anonymous \
    --db "$(mktemp -d)/serrano.db" 2>/dev/null &
done
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for port in 18183 18184; do
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
done
for pair in "new 18183" "old 18184"; do
  set -- $pair
  echo "== $1"
  "$new" bench --url "http://127.0.0.1:$2/v1" --workload bench/workloads/bursty-chat.toml \
    --sweep --slo "$slo" 2>/dev/null
done
