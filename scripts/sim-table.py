#!/usr/bin/env python3
"""The simulator's validation table (scripts/sim-validate.sh, scripts/sim-validate-fleet.sh).

    scripts/sim-table.py OUT_DIR CASE...

For each CASE, OUT_DIR/CASE.measured.json (`serrano bench --json`) and OUT_DIR/CASE.sim.json
(`serrano sim run --json`, the same trace): p50 and p99 of TTFT, TPOT and E2E, and the errors,
as a markdown table with the worst error against the issue's targets (10% at p50, 20% at p99).
"""
import json
import os
import sys

out, cases = sys.argv[1], sys.argv[2:]
print("| case | metric | measured p50 / p99 ms | simulated p50 / p99 ms | error p50 / p99 |")
print("| --- | --- | ---: | ---: | ---: |")
worst = {"50": 0.0, "99": 0.0}
for name in cases:
    m = json.load(open(os.path.join(out, name + ".measured.json")))
    s = json.load(open(os.path.join(out, name + ".sim.json")))
    for metric in ["ttft", "tpot", "e2el"]:
        mv = [m[f"p{p}_{metric}_ms"] for p in ("50", "99")]
        sv = [s[f"p{p}_{metric}_ms"] for p in ("50", "99")]
        err = [(b / a - 1) * 100 for a, b in zip(mv, sv)]
        for p, e in zip(("50", "99"), err):
            worst[p] = max(worst[p], abs(e))
        print(f"| {name} | {metric.upper()} | {mv[0]:.1f} / {mv[1]:.1f} | {sv[0]:.1f} / {sv[1]:.1f} "
              f"| {err[0]:+.0f}% / {err[1]:+.0f}% |")
print(f"\nWorst error: p50 {worst['50']:.0f}% (target 10%), p99 {worst['99']:.0f}% (target 20%).")
