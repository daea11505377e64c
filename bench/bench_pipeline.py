"""Latency of the whole pipeline through the real server and embedded models, seen by a WebSocket client.

For each turn: user message sent → first reply text, first audio (TTS of the first piece done, from the
server's timings), first video fragment received. Also: stop → turn_done latency, event-loop
responsiveness (ping round trips while turns render), server RSS at idle and per extra session.

    .venv/bin/python bench/bench_pipeline.py [--turns 24]
    .venv/bin/python bench/bench_pipeline.py --gateway --turns 12   # role all vs gateway + avatar service
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


async def one_turn(ws, text: str, turn_id: int) -> dict[str, float]:
    """One text turn on an open session: latencies from the user's message, in ms."""
    t0 = time.perf_counter()
    await ws.send(json.dumps({"type": "user_text", "text": text}))
    first_text = first_video = None
    while True:
        msg = await asyncio.wait_for(ws.recv(), 120)
        now = time.perf_counter()
        if isinstance(msg, bytes):
            if first_video is None and HEADER.unpack_from(msg)[3] == turn_id:
                first_video = now
            continue
        e = json.loads(msg)
        if e["type"] == "text_delta" and first_text is None:
            first_text = now
        if e["type"] == "turn_done":
            break
    if first_text is None or first_video is None:
        raise RuntimeError(f"turn {turn_id} produced no text or video: {e}")
    return {
        "first_text": (first_text - t0) * 1000,
        "first_video": (first_video - t0) * 1000,
        "first_piece": float(e["timings"]["first_piece"]),  # server timings
        "first_audio": float(e["timings"]["first_audio"]),
        "turn_total": (now - t0) * 1000,
    }


async def turns(base: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "first_text": [], "first_piece": [], "first_audio": [], "first_video": [], "turn_total": []
    }
    async with connect(f"ws://{base}/ws", max_size=None) as ws:
        await recv_until(ws, "session")
        for i in range(n):
            for k, v in (await one_turn(ws, PROMPTS[i % len(PROMPTS)], i + 1)).items():
                out[k].append(v)
            await asyncio.sleep(0.2)
    return out


async def compare_roles(n: int) -> None:
    """Role ``all`` (baseline) against ``gateway`` + ``avatar`` (rendering over the render API), all three
    servers up at once and turns alternating between the two set-ups, so machine noise hits both alike."""
    keys = ("first_text", "first_audio", "first_video", "turn_total")
    with server() as (one, _), server({"AVATARCHAT_SERVICES__ROLE": "avatar"}) as (avatar, _), \
            server({"AVATARCHAT_SERVICES__ROLE": "gateway", "AVATARCHAT_SERVICES__AVATAR__URL": f"http://{avatar}"}) as (gw, _):
        setups = {"all": one, "gateway+avatar": gw}
        out: dict[str, dict[str, list[float]]] = {name: {k: [] for k in keys} for name in setups}
        async with connect(f"ws://{one}/ws", max_size=None) as ws_all, connect(f"ws://{gw}/ws", max_size=None) as ws_gw:
            sockets = {"all": ws_all, "gateway+avatar": ws_gw}
            for ws in sockets.values():
                await recv_until(ws, "session")
            for i in range(n + 2):  # the first two of each are warm-up
                order = list(setups) if i % 2 == 0 else list(reversed(setups))
                for name in order:
                    got = await one_turn(sockets[name], PROMPTS[i % len(PROMPTS)], i + 1)
                    if i >= 2:
                        for k in keys:
                            out[name][k].append(got[k])
                    await asyncio.sleep(0.2)
    print(f"\ntext turns, {n} per set-up, alternating:")
    for name, t in out.items():
        print(f"  {name}:")
        for k in keys:
            print(f"    {k:12} {summary(t[k])}")
    base, remote = (stats(out[name]["first_video"])["p50"] for name in setups)
    print(f"first_video p50 ratio gateway+avatar / all: {remote / base:.3f} ({remote - base:+.1f} ms)")
    dump("pipeline_roles", {name: {k: stats(v) for k, v in t.items()} for name, t in out.items()})


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
    ap.add_argument("--gateway", action="store_true",
                    help="only compare first-video latency: role all vs --role gateway + --role avatar")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if args.gateway:
        await compare_roles(args.turns)
        return
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
