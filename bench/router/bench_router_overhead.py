"""Added latency of the router at 200 concurrent streams, against calling the upstream directly.

    .venv/bin/python bench/router/bench_router_overhead.py [--streams 200 --rounds 6]

Three processes: a loopback upstream (tests/support/openai_server.py: 16 tokens, 100 ms apart), the
router CLI (one channel to that upstream), and this client (raw asyncio connections). In each
round 200 streams are open at once in a steady state (workers start evenly over one stream's length and
run streams back to back). Rounds alternate direct / via router so both see the same machine load. Per stream: time to the first content
byte (TTFT) and to the end of the stream. Added latency = router p50 − direct p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import json
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _rb  # noqa: E402
from _common import dump, free_port, machine  # noqa: E402

TOKENS, GAP_S = 16, 0.1
STREAM_S = TOKENS * GAP_S
BODY = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def one(client: object, url: str, start: asyncio.Event) -> tuple[float, float]:
    """One stream over a raw asyncio connection (a minimal HTTP/1.1 client: httpx itself costs more CPU
    than the router at 200 streams on 2 cores, which would hide what is measured)."""
    await start.wait()
    u = urlsplit(url)
    body = json.dumps(BODY).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(f"POST {u.path} HTTP/1.1\r\nhost: {u.netloc}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
    ttft = None
    tail = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            if ttft is None and (b'"content": "w' in (w := tail[-32:] + chunk) or b'"content":"w' in w):
                ttft = time.perf_counter() - t0
            tail = (tail + chunk)[-64:]
    finally:
        writer.close()
    assert b"data: [DONE]" in tail, tail
    return (ttft or 0.0) * 1000, (time.perf_counter() - t0) * 1000


async def round_(url: str, streams: int, per_worker: int) -> tuple[list[float], list[float]]:
    """``streams`` workers, started evenly over one stream's duration, each running ``per_worker`` streams
    back to back: ~``streams`` streams are open at any moment (a steady state, not one burst)."""
    ttft, total = [], []
    client = None
    if True:
        start = asyncio.Event()
        start.set()

        async def worker(i: int) -> None:
            await asyncio.sleep(i * STREAM_S / streams)
            for k in range(per_worker):
                t, tot = await one(client, url, start)
                if k:  # the first stream of a worker opens its connection; measure the steady state
                    ttft.append(t)
                    total.append(tot)

        await asyncio.gather(*(worker(i) for i in range(streams)))
    return ttft, total


def p(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q))


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-worker", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    with _rb.upstream_process(token_delay_s=GAP_S, reply=" ".join(f"w{i}" for i in range(TOKENS))) as up:
        cfg = _rb.router_config(up, None, providers=1, loop_lag_probe=True,
                                retry={"ttft_timeout_s": 30, "stall_timeout_s": 30})
        cfg["channels"] = [{"name": "only", "provider": "p0", "models": ["test-model"]}]
        path = _rb.write_yaml(tmp / "r.yaml", cfg)
        port = free_port()
        proc = _rb.start_router(path, port)
        router = f"http://127.0.0.1:{port}"
        try:
            _rb.wait_ready(router, proc)
            direct_url, router_url = up + "/chat/completions", router + "/v1/chat/completions"
            d_ttft, d_total, r_ttft, r_total, loads = [], [], [], [], []
            for i in range(args.rounds):
                for kind in (("direct", "router") if i % 2 == 0 else ("router", "direct")):
                    t, tot = await round_(direct_url if kind == "direct" else router_url, args.streams, args.per_worker)
                    (d_ttft if kind == "direct" else r_ttft).extend(t)
                    (d_total if kind == "direct" else r_total).extend(tot)
                loads.append(os.getloadavg()[0])
            st = _rb.admin_stats(router)
        finally:
            proc.kill()
            proc.wait(10)
    print(f"machine: {machine()}; {args.streams} concurrent streams × {args.rounds} rounds each way; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    rows = {"ttft": (d_ttft, r_ttft), "total": (d_total, r_total)}
    out = {}
    for name, (d, r) in rows.items():
        added50, added95 = p(r, 50) - p(d, 50), p(r, 95) - p(d, 95)
        out[name] = {"direct_p50": p(d, 50), "direct_p95": p(d, 95), "router_p50": p(r, 50), "router_p95": p(r, 95),
                     "added_p50": added50, "added_p95": added95}
        print(f"{name:6s} direct p50 {p(d, 50):7.1f} p95 {p(d, 95):7.1f} | router p50 {p(r, 50):7.1f} p95 {p(r, 95):7.1f} "
              f"| added p50 {added50:+6.1f} ms p95 {added95:+6.1f} ms (ratio p50 {p(r, 50) / p(d, 50):.2f})")
    print(f"router loop: max lag {st['max_loop_lag_ms']} ms, max loop CPU between ticks {st['max_loop_cpu_ms']} ms")
    print(f"target added p50 ≤ 2 ms (TTFT): {'PASS' if out['ttft']['added_p50'] <= 2 else 'FAIL'}")
    dump("router_overhead", {"streams": args.streams, "rounds": args.rounds, "ms": out, "load_avg": [min(loads), max(loads)],
                              "router_loop": {"lag_ms": st["max_loop_lag_ms"], "cpu_ms": st["max_loop_cpu_ms"]}})
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
