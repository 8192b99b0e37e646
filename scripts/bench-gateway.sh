#!/usr/bin/env bash
# The governance layer's added latency: open-loop chat completions at increasing rates against a
# fast stub upstream on loopback, called directly, through `serrano gateway` (auth, budgets,
# rate limits and the durable audit log all on) and through a bare proxy with no governance at all
# (`bare_proxy`: the floor any Rust proxy pays here), interleaved per rate; then, in the same run,
# through LiteLLM's proxy. Usage: scripts/bench-gateway.sh [SECONDS_PER_RUN] [RATES...]
# Needs: a release build (cargo build --release -p serrano -p serrano-server --examples --bins)
# and LiteLLM in $LITELLM_VENV (default /tmp/litellm-venv: python3 -m venv ...; pip install 'litellm[proxy]').
# SKIP_LITELLM=1 measures direct and serrano only (for quick iterations; not for the record).
# SERRANO_BIN=PATH runs that serrano binary as the gateway (A/B comparisons of two builds).
# STORE=postgres puts the gateway's store on a private PostgreSQL server (its own initdb cluster
# on port 18194, fsync and synchronous_commit on, as durable as the SQLite default) instead of
# the SQLite file: what a fleet of replicas sharing one database pays per request.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; shift || true
rates=${*:-250 500 1000 2000}
bin=target/release
venv=${LITELLM_VENV:-/tmp/litellm-venv}
tmp=$(mktemp -d)
pids=()
pg_stop() { :; }
trap 'kill ${pids[*]} 2>/dev/null; pg_stop; cp "$tmp/gateway.log" /tmp/last-gateway.log 2>/dev/null; rm -rf "$tmp"' EXIT
wait_up() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }

$bin/examples/stub_upstream 18190 2>/dev/null & pids+=($!)
wait_up http://127.0.0.1:18190/v1/models

db="$tmp/serrano.db"
if [ "${STORE:-sqlite}" = postgres ]; then
  pgbin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)")
  [ -x "$pgbin/initdb" ] || { echo "STORE=postgres needs PostgreSQL (apt-get install postgresql)" >&2; exit 1; }
  # initdb refuses to run as root; the server then runs as `postgres`.
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  [ "$(id -u)" = 0 ] && chown -R postgres: "$tmp"
  as_pg "$pgbin/initdb" -D "$tmp/pg" -U serrano -A trust -E UTF8 --locale=C >/dev/null
  as_pg "$pgbin/pg_ctl" -D "$tmp/pg" -l "$tmp/pg.log" -w -t 60 start \
    -o "-p 18194 -k $tmp -c listen_addresses=127.0.0.1 -c max_connections=100" >/dev/null
  pg_stop() { as_pg "$pgbin/pg_ctl" -D "$tmp/pg" -m immediate stop >/dev/null 2>&1 || true; }
  db=postgres://serrano@127.0.0.1:18194/postgres
fi
echo "store: ${STORE:-sqlite}"
export SERRANO_ADMIN_KEY=sk-srn-bench-admin-key-0123456789abcdef
${SERRANO_BIN:-$bin/serrano} gateway --port 18191 --db "$db" --upstream http://127.0.0.1:18190/v1 \
  --upstream-model stub 2>"$tmp/gateway.log" & pids+=($!)
wait_up http://127.0.0.1:18191/health
$bin/examples/bare_proxy 18193 http://127.0.0.1:18190/v1/chat/completions & pids+=($!)
wait_up http://127.0.0.1:18193/health
admin() { curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" -H 'Content-Type: application/json' "http://127.0.0.1:18191/admin/v1/$1" -d "$2"; }
admin tenants '{"name":"bench"}' >/dev/null
key=$(admin keys '{"tenant":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
admin budgets '{"tenant":"bench","unit":"tokens","period":"day","limit":1e12}' >/dev/null
admin limits '{"tenant":"bench","rpm":10000000,"tpm":1000000000,"max_concurrent":100000}' >/dev/null
admin prices '{"model":"stub","backend":"upstream","input_per_million":0.15,"output_per_million":0.6}' >/dev/null

skip_litellm=${SKIP_LITELLM:-0}
run() { $bin/examples/overhead_bench "$1" "$2" "$3" "$secs"; }
# Warm each path first (connections, caches, the first statements), unmeasured: a cold start
# alone put 100-400 ms into the first rate's p99.
$bin/examples/overhead_bench http://127.0.0.1:18190/v1/chat/completions none 250 2 >/dev/null
$bin/examples/overhead_bench http://127.0.0.1:18191/v1/chat/completions "$key" 250 2 >/dev/null
$bin/examples/overhead_bench http://127.0.0.1:18193/v1/chat/completions none 250 2 >/dev/null
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The private PostgreSQL server's CPU: its postmaster and every child (0 for SQLite, which runs
# in the gateway). A backend that exits during a run takes its ticks with it (an undercount).
pg_ticks() {
  local t=0 p main
  main=$(head -1 "$tmp/pg/postmaster.pid" 2>/dev/null) || { echo 0; return; }
  for p in "$main" $(pgrep -P "$main"); do t=$(( t + $(cpu_ticks "$p" 2>/dev/null || echo 0) )); done
  echo $t
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for rate in $rates; do
  echo "direct   $(run http://127.0.0.1:18190/v1/chat/completions none "$rate")"
  before=$(cpu_ticks "${pids[2]}")
  out=$(run http://127.0.0.1:18193/v1/chat/completions none "$rate")
  used=$(( $(cpu_ticks "${pids[2]}") - before ))
  echo "bare     $out proxy CPU: $(( used * 10000 / $(getconf CLK_TCK) / (rate * secs / 100) )) us/request"
  before=$(cpu_ticks "${pids[1]}"); pg_before=$(pg_ticks)
  out=$(run http://127.0.0.1:18191/v1/chat/completions "$key" "$rate")
  used=$(( $(cpu_ticks "${pids[1]}") - before )); pg_used=$(( $(pg_ticks) - pg_before ))
  per() { echo $(( $1 * 10000 / $(getconf CLK_TCK) / (rate * secs / 100) )); }
  echo "serrano  $out gateway CPU: $(per $used) us/request$([ "${STORE:-sqlite}" = postgres ] && echo ", PostgreSQL CPU: $(per $pg_used) us/request")"
done
# LiteLLM last, on the same stub in the same run, and started only now: nothing it does (tens of
# seconds of backlog past its capacity, its own background tasks) can then land in the other
# paths' runs. (Interleaved with it, serrano's p99 read 36-55 ms where alone it read 3.5-9.6.)
if [ "$skip_litellm" != 1 ]; then
cat > "$tmp/litellm.yaml" <<YAML
model_list:
  - model_name: stub
    litellm_params: {model: openai/stub, api_base: "http://127.0.0.1:18190/v1", api_key: none}
general_settings: {master_key: sk-litellm-bench}
litellm_settings: {drop_params: true, telemetry: false}
YAML
"$venv/bin/litellm" --config "$tmp/litellm.yaml" --port 18192 --num_workers 1 >"$tmp/litellm.log" 2>&1 & pids+=($!)
wait_up http://127.0.0.1:18192/health/liveliness
$bin/examples/overhead_bench http://127.0.0.1:18192/v1/chat/completions sk-litellm-bench 50 2 >/dev/null
for rate in $rates; do
  echo "litellm  $(run http://127.0.0.1:18192/v1/chat/completions sk-litellm-bench "$rate")"
done
fi
# Where serrano's time went, over the whole run: the store's reserve and finish waits.
curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" http://127.0.0.1:18191/metrics | python3 -c '
import re, sys
ops = {}
for line in sys.stdin:
    m = re.match(r"serrano_gov_store_seconds_(bucket|sum|count)\{(.*?)\} (\S+)", line)
    if not m:
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
    o = ops.setdefault(labels["op"], {"buckets": {}})
    if m.group(1) == "bucket":
        o["buckets"][labels["le"]] = float(m.group(3))
    else:
        o[m.group(1)] = float(m.group(3))
for op, o in sorted(ops.items()):
    n = o.get("count", 0) or 1
    mean = 1e3 * o.get("sum", 0) / n
    s = [100 * o["buckets"].get(le, 0) / n for le in ("0.00025", "0.0005", "0.001", "0.0025")]
    print(f"store {op}: {int(n)} calls, mean {mean:.3f} ms, <= 0.25 ms {s[0]:.0f}%, "
          f"<= 0.5 ms {s[1]:.0f}%, <= 1 ms {s[2]:.1f}%, <= 2.5 ms {s[3]:.1f}%")
'
echo "serrano gateway peak RSS: $(grep VmHWM /proc/${pids[1]}/status)"
echo "audit records: $(curl -sf -H "Authorization: Bearer $SERRANO_ADMIN_KEY" http://127.0.0.1:18191/admin/v1/audit/verify)"
