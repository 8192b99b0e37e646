#!/usr/bin/env bash
# What traces cost the gateway (BENCHMARKS.md, "Traces"): open-loop chat completions through
# three `serrano gateway`s over one fast stub upstream, interleaved per rate: traces off (no
# endpoint), on but unsampled (OTEL_TRACES_SAMPLER=always_off), and on and sampled, exporting
# over OTLP/HTTP to the test suite's receiver (crates/serrano/tests/otlp_receiver.py).
#   scripts/bench-traces.sh [SECONDS_PER_RUN=5] [RATES=250 1000]
# Needs: cargo build --release -p serrano -p serrano-server --examples --bins, and the receiver's
# venv (target/otelenv, made by .ci/run or the traces test).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; shift || true
rates=${*:-250 1000}
bin=target/release
tmp=$(mktemp -d)
pids=()
trap 'kill ${pids[*]} 2>/dev/null; rm -rf "$tmp"' EXIT
wait_up() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }
$bin/examples/stub_upstream 18250 2>/dev/null & pids+=($!)
wait_up http://127.0.0.1:18250/v1/models
target/otelenv/bin/python crates/serrano/tests/otlp_receiver.py --http-port 18259 --out "$tmp/spans.jsonl" >/dev/null & pids+=($!)
export SERRANO_ADMIN_KEY=sk-srn-bench-admin-key-0123456789abcdef
gateway() { # PORT [ENV...]
  local port=$1; shift
  env "$@" $bin/serrano gateway --port "$port" --db "$tmp/$port.db" --upstream http://127.0.0.1:18250/v1 \
    --upstream-model stub 2>"$tmp/$port.log" & pids+=($!)
  wait_up "http://127.0.0.1:$port/health"
}
gateway 18251
gateway 18252 OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18259 OTEL_TRACES_SAMPLER=always_off
gateway 18253 OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18259
run() { $bin/examples/overhead_bench "http://127.0.0.1:$1/v1/chat/completions" "$SERRANO_ADMIN_KEY" "$2" "$3"; }
for port in 18251 18252 18253; do run $port 250 2 >/dev/null; done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for rate in $rates; do
  echo "direct     $($bin/examples/overhead_bench http://127.0.0.1:18250/v1/chat/completions none "$rate" "$secs")"
  echo "off        $(run 18251 "$rate" "$secs")"
  echo "unsampled  $(run 18252 "$rate" "$secs")"
  echo "sampled    $(run 18253 "$rate" "$secs")"
done
sleep 6
echo "spans received: $(wc -l < "$tmp/spans.jsonl")"
