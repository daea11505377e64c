#!/usr/bin/env bash
# All four router benches in turn (figures go to bench/results/router_*.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY bench/router/bench_router_coldstart.py --runs 12
$PY bench/router/bench_router_decision.py
$PY bench/router/bench_router_overhead.py
$PY bench/router/bench_router_failover.py
