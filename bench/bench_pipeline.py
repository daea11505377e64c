"""Latency of the whole pipeline through the real server and embedded models, seen by a WebSocket client.

For each turn: user message sent → first reply text, first audio (TTS of the first piece done, from the
server's timings), first video fragment received. Also: stop → turn_done latency, event-loop
responsiveness (ping round trips while turns render), server RSS at idle and per extra session.

    .venv/bin/python bench/bench_pipeline.py [--turns 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psutil
from websockets.asyncio.client import connect

from _common import HEADER, dump, machine, server, stats, summary

PROMPTS = [
    "Hello! Who are you?",
    "What is your favourite colour?",
    "Tell me something about the ocean.",
    "How do I make a cup of tea?",
    "What can you do for me?",
    "Give me a fun fact about space.",
    "What is the weather like on Mars?",
    "Why is the sky blue?",
]


async def recv_until(ws, kind: str, on_media=None, timeout: float = 120):
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, bytes):
            if on_media:
                on_media(msg)
            continue
        e = json.loads(msg)
        if e["type"] == kind:
            return e


async def turns(base: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "first_text": [], "first_piece": [], "first_audio": [], "first_video": [], "turn_total": []
    }
    async with connect(f"ws://{base}/ws", max_size=None) as ws:
        await recv_until(ws, "session")
        for i in range(n):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "user_text", "text": PROMPTS[i % len(PROMPTS)]}))
            first_text = first_video = None
            while True:
                msg = await asyncio.wait_for(ws.recv(), 120)
                now = time.perf_counter()
                if isinstance(msg, bytes):
                    if first_video is None and HEADER.unpack_from(msg)[3] == i + 1:
                        first_video = now
                    continue
                e = json.loads(msg)
                if e["type"] == "text_delta" and first_text is None:
                    first_text = now
                if e["type"] == "turn_done":
                    break
            if first_text is None or first_video is None:
                raise RuntimeError(f"turn {i} produced no text or video: {e}")
            out["first_text"].append((first_text - t0) * 1000)
            out["first_video"].append((first_video - t0) * 1000)
            out["first_piece"].append(float(e["timings"]["first_piece"]))  # server timings
            out["first_audio"].append(float(e["timings"]["first_audio"]))
            out["turn_total"].append((now - t0) * 1000)
            await asyncio.sleep(0.2)
    return out


async def stop_latency(base: str, n: int) -> list[float]:
    """stop → turn_done(stopped). A reply that ends before the stop arrives is not counted."""
    lat: list[float] = []
    async with connect(f"ws://{base}/ws", max_size=None) as ws:
        await recv_until(ws, "session")
        for i in range(3 * n):
            if len(lat) == n:
                break
            await ws.send(json.dumps({"type": "user_text", "text": "Tell me a long story about a dragon."}))
            await recv_until(ws, "media_start")
            await asyncio.sleep(0.1 + 0.02 * (i % 5))
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "stop"}))
            e = await recv_until(ws, "turn_done")
            if e["reason"] == "stopped":
                lat.append((time.perf_counter() - t0) * 1000)
    return lat


async def loop_lag(base: str, n_turns: int) -> list[float]:
    """Ping round trips on one session while another session runs turns: the loop must stay responsive."""
    rtts: list[float] = []
    async with connect(f"ws://{base}/ws", max_size=None) as busy, connect(f"ws://{base}/ws") as probe:
        await recv_until(busy, "session")
        await recv_until(probe, "session")

        async def drive() -> None:
            for i in range(n_turns):
                await busy.send(json.dumps({"type": "user_text", "text": PROMPTS[i % len(PROMPTS)]}))
                await recv_until(busy, "turn_done")

        task = asyncio.create_task(drive())
        k = 0
        while not task.done():
            k += 1
            t0 = time.perf_counter()
            await probe.send(json.dumps({"type": "ping", "id": k}))
            await recv_until(probe, "pong")
            rtts.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.02)
        await task
    return rtts


async def memory(base: str, proc_pid: int, extra: int) -> dict[str, float]:
    p = psutil.Process(proc_pid)
    idle = p.memory_info().rss / 2**20
    socks = []
    for _ in range(extra):
        ws = await connect(f"ws://{base}/ws", max_size=None)
        await recv_until(ws, "session")
        await ws.send(json.dumps({"type": "user_text", "text": "Hello there!"}))
        await recv_until(ws, "turn_done")
        socks.append(ws)
    loaded = p.memory_info().rss / 2**20
    for ws in socks:
        await ws.close()
    return {"idle_mb": idle, "with_sessions_mb": loaded, "per_session_mb": (loaded - idle) / extra, "sessions": extra}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--stops", type=int, default=20)
    ap.add_argument("--turns-only", action="store_true", help="skip the stop, loop-lag and memory parts")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with server() as (base, proc):
        await turns(base, 2)  # warm-up: first-use allocations, prompt cache
        if args.turns_only:
            t = await turns(base, args.turns)
            for k in t:
                print(f"  {k:12} {summary(t[k])}")
            return
        mem = await memory(base, proc.pid, 4)
        t = await turns(base, args.turns)
        stops = await stop_latency(base, args.stops)
        lag = await loop_lag(base, 4)
    print(f"\nturn latency from the user's message, {args.turns} turns:")
    for k in ("first_text", "first_piece", "first_audio", "first_video", "turn_total"):
        print(f"  {k:12} {summary(t[k])}")
    print(f"stop → turn_done:            {summary(stops)}")
    print(f"ping RTT during turns:       {summary(lag)}")
    print(f"server RSS: idle {mem['idle_mb']:.0f} MB, +{mem['per_session_mb']:.1f} MB per extra session "
          f"({mem['sessions']} sessions → {mem['with_sessions_mb']:.0f} MB)")
    dump("pipeline", {"turns": {k: stats(v) for k, v in t.items()}, "stop_ms": stats(stops), "ping_ms": stats(lag), "memory": mem})


if __name__ == "__main__":
    asyncio.run(main())
