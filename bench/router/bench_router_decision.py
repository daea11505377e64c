"""Routing decision time at 10,000 models: parse the model string, look it up, rank the candidates and
build the failover plan (everything but the HTTP call), in-process.

    .venv/bin/python bench/router/bench_router_decision.py [--n 20000]

Per query kind: warm (the usual case: the tag-query result is cached per index version) and cold (the
first request after an index change). Baseline in the same run: a linear scan over all entries per
request, as a router without an index does.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _rb  # noqa: E402
from _common import dump, machine  # noqa: E402

from avatarchat.router import strategies  # noqa: E402
from avatarchat.router.config import load_config  # noqa: E402
from avatarchat.router.service import Router  # noqa: E402


def pct(a: list[float]) -> dict[str, float]:
    x = np.asarray(a) * 1e6  # µs
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000, help="decisions per query kind")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="router-decide-"))
    cache = tmp / "models.json"
    ids = _rb.generate_cache(cache, 10_000)
    cfg_path = _rb.write_yaml(tmp / "r.yaml", _rb.router_config("http://127.0.0.1:9/v1", str(cache), loop_lag_probe=False))
    router = Router(load_config(cfg_path), cfg_path)
    await router.start()
    await router.state.index.complete.wait()
    state = router.state
    print(f"machine: {machine()}; index: {len(state.index.entries)} entries, {len(state.index.by_tag)} tags")
    rng = random.Random(1)
    for h in router.health.values():  # measured channels, so speed/balanced use real EWMA values
        h.success(rng.uniform(0.2, 2.0), rng.uniform(0.05, 0.8))
    queries = {
        "exact model": lambda: rng.choice(ids),
        "alias → tag query": lambda: "chat",
        "tag:free (3,300 matches)": lambda: "tag:free",
        "tag:free,qwen,!key0": lambda: "tag:free,qwen,!key0",
        "tag:72b,!free": lambda: "tag:72b,!free",
    }
    results = {}
    gc.collect()
    for name, pick in queries.items():
        for strategy in ("balanced", "speed"):
            warm, cold = [], []
            for i in range(args.n):
                model = pick()
                if i % 200 == 0:  # an index change invalidates the caches: the next decision is cold
                    state.index.version += 1
                    t0 = time.perf_counter()
                    q = router.parse(model, state)
                    plan = router.decide(state, q, strategy)
                    cold.append(time.perf_counter() - t0)
                    continue
                t0 = time.perf_counter()
                q = router.parse(model, state)
                plan = router.decide(state, q, strategy)
                warm.append(time.perf_counter() - t0)
            assert plan, name
            results[f"{name} [{strategy}]"] = {"warm": pct(warm), "cold": pct(cold), "candidates": sum(len(v) for v in router._groups(state, q, strategy).values())}
    # Baseline: no index, scan every entry for the tags, then sort by score.
    base = []
    entries = state.index.entries
    inc, exc = frozenset({"free", "qwen"}), frozenset({"key0"})
    for _ in range(200):
        t0 = time.perf_counter()
        found = [e for e in entries if inc <= e.tags and not (exc & e.tags)]
        groups = strategies.group_by_channel("balanced", found)
        strategies.rank("balanced", groups, router.health, 4)
        base.append(time.perf_counter() - t0)
    await router.close()
    print(f"{'query [strategy]':42s} {'cands':>6s}  {'warm p50':>9s} {'warm p99':>9s} {'cold p50':>9s} {'cold p99':>9s}  (µs)")
    worst_p99 = 0.0
    for name, r in results.items():
        worst_p99 = max(worst_p99, r["warm"]["p99"])
        print(f"{name:42s} {r['candidates']:6d}  {r['warm']['p50']:9.1f} {r['warm']['p99']:9.1f} {r['cold']['p50']:9.1f} {r['cold']['p99']:9.1f}")
    b = pct(base)
    tq = results["tag:free,qwen,!key0 [balanced]"]["warm"]
    print(f"baseline linear scan, tag:free,qwen,!key0: p50 {b['p50']:.1f} µs p99 {b['p99']:.1f} µs; "
          f"ratio to warm p50: {b['p50'] / tq['p50']:.0f}x, to cold p50: {b['p50'] / results['tag:free,qwen,!key0 [balanced]']['cold']['p50']:.1f}x")
    print(f"worst warm p99: {worst_p99:.1f} µs   target p99 ≤ 1000 µs: {'PASS' if worst_p99 <= 1000 else 'FAIL'}")
    dump("router_decision", {"results_us": results, "baseline_us": b, "entries": len(entries)})
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
