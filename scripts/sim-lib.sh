# Shared by the simulator's validation scripts (sourced, not run):
# scripts/sim-validate.sh, scripts/sim-validate-fleet.sh, scripts/sim-validate-live.sh.
# Each sets B (the binary) and OUT (where results go) first; this makes OUT, a scratch DIR the
# script removes, and an admin key its servers register (so none writes a first-key file).
mkdir -p "$OUT"
DIR=$(mktemp -d)
export SERRANO_ADMIN_KEY=${SERRANO_ADMIN_KEY:-sk-sim-validate-admin-0123456789abcdef01}

# Waits up to two minutes for a server's /health on 127.0.0.1:PORT; exits the script if none.
wait_up() { # PORT
  for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server on $1 did not start" >&2
  exit 1
}

# A seeded Poisson or gamma trace (`serrano bench --trace`'s JSON lines), one tenant, the seed
# from the file's name: NAME N RATE CV PMIN PMAX OUT.
trace() {
  python3 - "$@" <<'PY'
import json, os, random, sys, zlib
name, n, rate, cv = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pmin, pmax, out = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
rng = random.Random(zlib.crc32(os.path.basename(name).encode()))
shape = 1.0 / (cv * cv)
t = 0.0
with open(name, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"time": round(t, 4), "prompt_tokens": rng.randint(pmin, pmax),
                            "output_tokens": out}) + "\n")
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
PY
}
