"""Soak: many short sessions one after another on one server, watching what a leak would grow (issue 14).

``--sessions`` sessions (500), ``--concurrency`` (6) at a time: each opens a WebSocket, has one short text
turn (the LLM is a loopback OpenAI-compatible server, so a turn costs its speech, not an LLM's thinking),
consumes its media and closes. A session the server refuses (``server_busy``, its measured capacity) waits
the ``retry_after_ms`` it was told and tries again. Measured from outside the server process, at the start
(after a warm-up turn in each of ``--concurrency`` sessions at once) and after every ``--every`` sessions,
each time once the sessions in flight have ended and ``--settle-s`` has passed: RSS, open fds
(/proc/PID/fd), threads (/proc/PID/task) and the event loop's tasks (``/api/monitor``). Pass: RSS grew at
most 5 % from the baseline, and fds, threads and tasks did not grow (at most a small slack, below).

    .venv/bin/python bench/bench_soak.py                      # 500 sessions, 6 at a time (~6 min on 2 cores)
    .venv/bin/python bench/bench_soak.py --sessions 100 --every 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import HEADER, dump, machine, server, stats  # noqa: E402

REPLY = "Sure. Here is a short answer for you."  # ~2.5 s of speech
PROMPTS = ["Hello!", "How are you?", "Tell me a joke.", "What time is it?", "Say something short."]
RSS_GROWTH_MAX = 0.05
SLACK = {"fds": 4, "threads": 2, "tasks": 2}  # pooled keep-alive connections come and go; pools are bounded


async def one_session(base: str, prompt: str, result: dict[str, Any]) -> None:
    refused = 0
    while True:
        async with connect(f"ws://{base}/ws", max_size=None, open_timeout=60) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if first["type"] == "error":
                assert first["code"] in ("server_busy", "session_limit"), first
                refused += 1
                retry_s = first.get("retry_after_ms", 500) / 1000
            else:
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "user_text", "text": prompt}))
                turn_id, media, errors = None, 0, []
                while True:
                    msg = await asyncio.wait_for(ws.recv(), 120)
                    if isinstance(msg, bytes):
                        if HEADER.unpack_from(msg)[3] == turn_id:
                            media += len(msg) - HEADER.size
                        continue
                    e = json.loads(msg)
                    if e["type"] == "turn_start":
                        turn_id = e["turn_id"]
                    elif e["type"] == "error":
                        errors.append(e["code"])
                    elif e["type"] == "turn_done" and e["turn_id"] == turn_id:
                        break
                result.update(turn_ms=(time.perf_counter() - t0) * 1000, reason=e["reason"], media_bytes=media,
                              errors=errors, refused=refused)
                return
        await asyncio.sleep(retry_s)


def sample(base: str, pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    monitor = httpx.get(f"http://{base}/api/monitor", params={"turns": 1}, timeout=30).json()
    return {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task")), "tasks": monitor["tasks"]}


async def wave(base: str, n: int, concurrency: int, offset: int) -> list[dict[str, Any]]:
    """``n`` sessions, ``concurrency`` at a time; returns once every one has ended."""
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            await one_session(base, PROMPTS[(offset + i) % len(PROMPTS)], results[i])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def slope(xs: list[int], ys: list[float]) -> float:
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else 0.0


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--every", type=int, default=100, help="sample after every this many sessions")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after a wave ends, before sampling")
    ap.add_argument("--name", default="soak")
    args = ap.parse_args()

    from tests.support.openai_server import Behaviour, OpenAITestServer

    upstream = OpenAITestServer().start()
    upstream.behaviour = Behaviour(reply=REPLY, token_delay_s=0.005)
    env = {"AVATARCHAT_LLM__ENGINE": "openai", "AVATARCHAT_LLM__OPENAI__BASE_URL": upstream.base_url,
           "AVATARCHAT_LLM__OPENAI__MODEL": "bench", "AVATARCHAT_SESSION__MAX_SESSIONS": str(args.concurrency + 2)}
    print(f"soak: {machine()}, {args.sessions} sessions, {args.concurrency} at a time", flush=True)
    rows: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        with server(env) as (base, proc):
            await wave(base, args.concurrency, args.concurrency, 0)  # warm-up: one turn in each of N at once
            await asyncio.sleep(args.settle_s)
            checkpoints.append({"sessions": 0, **sample(base, proc.pid)})
            print(f"baseline (after warm-up): {checkpoints[0]}", flush=True)
            done = 0
            while done < args.sessions:
                n = min(args.every, args.sessions - done)
                t = time.perf_counter()
                res = await wave(base, n, args.concurrency, done)
                rows += res
                done += n
                await asyncio.sleep(args.settle_s)
                cp = {"sessions": done, **sample(base, proc.pid), "wave_s": round(time.perf_counter() - t, 1)}
                checkpoints.append(cp)
                print(f"after {done:4}: RSS {cp['rss_mb']:7.1f} MB  fds {cp['fds']:4}  threads {cp['threads']:3}  "
                      f"tasks {cp['tasks']:3}  ({n} sessions in {cp['wave_s']} s)", flush=True)
    finally:
        upstream.stop()
    wall = time.perf_counter() - started

    base_cp, last = checkpoints[0], checkpoints[-1]
    growth = (last["rss_mb"] - base_cp["rss_mb"]) / base_cp["rss_mb"]
    xs = [c["sessions"] for c in checkpoints]
    verdicts = {"rss": growth <= RSS_GROWTH_MAX}
    trends: dict[str, Any] = {}
    for key, slack in SLACK.items():
        ys = [c[key] for c in checkpoints]
        trends[key] = {"first": ys[0], "last": ys[-1], "max": max(ys),
                       "slope_per_100": round(slope(xs, ys) * 100, 2)}
        verdicts[key] = ys[-1] - ys[0] <= slack
    incomplete = [r for r in rows if r.get("reason") != "complete"]
    refused = sum(r.get("refused", 0) for r in rows)
    turn = stats([r["turn_ms"] for r in rows])
    print(f"{len(rows)} sessions in {wall:.0f} s: turns complete {len(rows) - len(incomplete)}/{len(rows)}, "
          f"turn p50 {turn['p50']:.0f} ms p95 {turn['p95']:.0f} ms, refused (server_busy, retried) {refused}")
    # A leak keeps its slope; memory the allocator keeps for reuse levels off: the second half tells them apart.
    late = [c for c in checkpoints if c["sessions"] >= args.sessions / 2]
    late_slope = round(slope([c["sessions"] for c in late], [c["rss_mb"] for c in late]) * 100, 2)
    print(f"RSS {base_cp['rss_mb']} → {last['rss_mb']} MB ({growth * 100:+.1f} %, max "
          f"{max(c['rss_mb'] for c in checkpoints)} MB; pass ≤ +{RSS_GROWTH_MAX * 100:.0f} %): "
          f"{'PASS' if verdicts['rss'] else 'FAIL'}; second half {late_slope:+} MB per 100 sessions")
    for key, t in trends.items():
        print(f"{key:7}: {t['first']} → {t['last']} (max {t['max']}, slope {t['slope_per_100']:+} per 100 sessions; "
              f"pass: grew ≤ {SLACK[key]}): {'PASS' if verdicts[key] else 'FAIL'}")
    ok = all(verdicts.values()) and not incomplete
    print("soak:", "PASS" if ok else "FAIL")
    dump(args.name, {"command": " ".join(["bench/bench_soak.py", *sys.argv[1:]]), "sessions": len(rows),
                     "concurrency": args.concurrency, "wall_s": round(wall, 1), "turn_ms": turn,
                     "incomplete": len(incomplete), "refused_retried": refused, "checkpoints": checkpoints,
                     "rss_growth": round(growth, 4), "rss_mb_per_100_second_half": late_slope, "trends": trends, "verdicts": verdicts, "pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    sys.exit(asyncio.run(main()))
