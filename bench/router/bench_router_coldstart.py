"""Cold start: process start → first routed response, with a generated 10,000-model ~50 MB discovery cache.

    .venv/bin/python bench/router/bench_router_coldstart.py [--runs 12]

The first request asks for the LAST discovered model (worst case: it needs the whole index). Baseline,
measured in the same run: the seed's way, a process that json.loads the whole cache and builds the full
index before it can serve. Also reported: the router's max event-loop lag during start-up (its probe).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _rb  # noqa: E402
from _common import dump, free_port, machine, stats, summary  # noqa: E402

BASELINE = """
import json, sys, time
t0 = time.perf_counter()
sys.path[:0] = [sys.argv[2]]
from avatarchat.router.config import load_config
from avatarchat.router.discovery import models_from_cache
from avatarchat.router.index import Index, discovered_entries, static_entries
cfg = load_config(sys.argv[1])
with open(cfg.discovery_cache, "rb") as f:
    data = json.load(f)
idx = Index(); idx.add(static_entries(cfg)); idx.add(list(discovered_entries(cfg, models_from_cache(data))))
print(len(idx.entries))
"""


def first_response(url: str, model: str, deadline_s: float = 30) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=10) as c:
        while True:
            try:
                r = c.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"first request failed: {r.status_code} {r.text[:300]}")
                return
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)


def one_run(cfg: Path, model: str) -> tuple[float, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = _rb.start_router(cfg, port)
    try:
        first_response(url, model)
        elapsed = (time.perf_counter() - t0) * 1000
        ct = psutil.Process(proc.pid).cpu_times()
        cpu_ms = (ct.user + ct.system) * 1000  # the router's own CPU up to its first answer
        deadline = time.monotonic() + 10
        while not (st := _rb.admin_stats(url))["index_complete"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        st = _rb.admin_stats(url)
    finally:
        proc.terminate()
        proc.wait(10)
    st["cpu_to_first_ms"] = cpu_ms
    return elapsed, st


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--models", type=int, default=10_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="router-cold-"))
    cache = tmp / "cache" / "models.json"
    ids = _rb.generate_cache(cache, args.models)
    size_mb = cache.stat().st_size / 1e6
    print(f"machine: {machine()}; cache: {len(ids)} models, {size_mb:.1f} MB", flush=True)
    with _rb.upstream_process() as up:
        cfg = _rb.write_yaml(tmp / "router.yaml", _rb.router_config(up, str(cache)))
        target = ids[-1]
        # Run 0: no snapshot yet (first start ever): the snapshot is built by a child process.
        first_ms, first_st = one_run(cfg, target)
        snap = cache.with_name(cache.name + ".snap")
        print(f"first start (snapshot rebuilt, {snap.stat().st_size / 1e6:.2f} MB): {first_ms:.0f} ms; "
              f"index {first_st['entries']} entries in {first_st['index_seconds']} s; max loop lag {first_st['max_loop_lag_ms']} ms "
              f"(loop CPU {first_st['max_loop_cpu_ms']} ms)")
        cold, lags, cpus, index_s, loads, cpu_first = [], [], [], [], [], []
        for _ in range(args.runs):
            ms, st = one_run(cfg, target)
            cold.append(ms)
            cpu_first.append(st["cpu_to_first_ms"])
            lags.append(st["max_loop_lag_ms"])
            cpus.append(st["max_loop_cpu_ms"])
            index_s.append(st["index_seconds"] * 1000)
            loads.append(os.getloadavg()[0])
        base = []
        for _ in range(max(3, args.runs // 3)):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", BASELINE, str(cfg), str(_rb.ROOT / "src")], check=True, capture_output=True)
            base.append((time.perf_counter() - t0) * 1000)
    print(f"cold start → first routed response : {summary(cold)}")
    print(f"  router CPU time to that response  : {summary(cpu_first)}   (load-independent)")
    print(f"  index complete after start-up     : {summary(index_s)}")
    print(f"  max event-loop lag, wall (probe)  : {summary(lags)}")
    print(f"  max loop-thread CPU between ticks : {summary(cpus)}   (our own blocking; wall lag includes other processes)")
    print(f"  1-min load average during runs    : {min(loads):.1f}-{max(loads):.1f} on 2 cores")
    print(f"baseline: json.load 50 MB + full index, before serving: {summary(base)}")
    ratio = stats(base)["p50"] / stats(cold)["p50"]
    # The baseline cannot serve anything before its index is built; the router answers from the snapshot.
    print(f"ratio baseline/router (p50): {ratio:.1f}x   target ≤ 1000 ms: {'PASS' if stats(cold)['p50'] <= 1000 else 'FAIL'}")
    dump("router_coldstart", {"models": len(ids), "cache_mb": size_mb, "first_start_ms": first_ms,
                               "cold_start_ms": stats(cold), "cpu_to_first_ms": stats(cpu_first), "index_ms": stats(index_s), "loop_lag_ms": stats(lags), "loop_cpu_ms": stats(cpus), "load_avg": [min(loads), max(loads)],
                               "baseline_ms": stats(base), "ratio": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
