"""Time to fail over after an upstream error: a request whose preferred channel fails, against the same
request when that channel is healthy (the difference is the failover cost).

    .venv/bin/python bench/router/bench_router_failover.py [--n 40]

Channel "bad" (preferred: higher priority) points at an upstream that answers 503, or at a closed port
(connection refused), or that sends nothing for longer than the TTFT timeout; channel "good" answers.
per_channel_retries=0 and a high failure threshold, so every request pays the failover (no cooldown
shortcut); a last row shows a request once "bad" is cooling down (skipped without a call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _rb  # noqa: E402
from _common import dump, free_port, machine, stats, summary  # noqa: E402

TTFT_S = 0.5


def config(bad_url: str, good_url: str, threshold: int = 10_000) -> dict:
    return {
        "providers": {"bad": {"base_url": bad_url}, "good": {"base_url": good_url}},
        "channels": [{"name": "bad", "provider": "bad", "models": ["m"], "priority": 1},
                     {"name": "good", "provider": "good", "models": ["m"]}],
        "retry": {"per_channel_retries": 0, "ttft_timeout_s": TTFT_S, "connect_timeout_s": 1},
        "cooldown": {"failure_threshold": threshold, "base_s": 60},
        "health": {"interval_s": 0}, "admin": {"token_env": "ROUTER_ADMIN_TOKEN"},
    }


def measure(cfg: dict, n: int, stream: bool, tmp: Path) -> tuple[list[float], str]:
    path = _rb.write_yaml(tmp / f"r{time.monotonic_ns()}.yaml", cfg)
    port = free_port()
    proc = _rb.start_router(path, port)
    url = f"http://127.0.0.1:{port}"
    out, channel = [], ""
    try:
        _rb.wait_ready(url, proc)
        body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=30) as c:
            for i in range(n + 3):
                t0 = time.perf_counter()
                with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    for chunk in r.iter_raw():
                        if b'"content": "' in chunk or b'"content":"' in chunk or not stream:
                            break
                    channel = r.headers["x-router-channel"]
                if i >= 3:  # warm-up: connections opened
                    out.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.kill()
        proc.wait()
    return out, channel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="router-failover-"))
    print(f"machine: {machine()}; times to the first token (stream) or the body (non-stream), n={args.n}")
    results = {}
    with _rb.upstream_process() as good, _rb.upstream_process(status=503) as bad503, \
            _rb.upstream_process(first_token_delay_s=30) as stall:
        refused = f"http://127.0.0.1:{free_port()}/v1"
        cases = {
            "healthy preferred channel (baseline)": (good, True),
            "healthy preferred channel (non-stream)": (good, False),
            "503 → failover (stream)": (bad503, True),
            "503 → failover (non-stream)": (bad503, False),
            "connection refused → failover": (refused, True),
            f"no first token in {TTFT_S} s → failover": (stall, True),
        }
        for name, (bad_url, stream) in cases.items():
            n = args.n if "first token" not in name else max(5, args.n // 4)
            ms, ch = measure(config(bad_url, good), n, stream, tmp)
            results[name] = {"ms": stats(ms), "channel": ch}
            print(f"{name:40s} → {ch:4s}  {summary(ms)}")
        ms, ch = measure(config(bad503, good, threshold=1), args.n, True, tmp)
        results["bad channel cooling down (skipped)"] = {"ms": stats(ms), "channel": ch}
        print(f"{'bad channel cooling down (skipped)':40s} → {ch:4s}  {summary(ms)}")
    base = results["healthy preferred channel (baseline)"]["ms"]["p50"]
    base_ns = results["healthy preferred channel (non-stream)"]["ms"]["p50"]
    for name, r in results.items():
        if "healthy" in name:
            continue
        b = base_ns if "non-stream" in name else base
        r["failover_cost_p50_ms"] = r["ms"]["p50"] - b
        print(f"  failover cost p50 (vs the healthy case): {name}: {r['failover_cost_p50_ms']:+.1f} ms")
    dump("router_failover", {"results": results, "ttft_timeout_s": TTFT_S})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
