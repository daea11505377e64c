"""Capacity: N simultaneous conversations on one server (issue 13).

Every session sends a text turn at the same moment (``burst``) or one after another (``staggered``,
``--stagger-s`` apart), and consumes its fMP4 as a player with a 300 ms start-up buffer would
(bench/_player.py). Per session: first video fragment after its message, and stalls (the player ran
dry). Per run: server CPU and RSS. With ``--llm openai`` the server's LLM is a loopback
OpenAI-compatible server streaming a realistic reply at ``--tok-s`` tokens/s; ``--load F`` runs a
busy process using about F of a core beside the server.

    .venv/bin/python bench/bench_capacity.py --sessions 1 2 4 6 8 --rounds 3
    .venv/bin/python bench/bench_capacity.py --llm openai --sessions 4 8 --rounds 3
    .venv/bin/python bench/bench_capacity.py --sessions 2 4 --load 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import HEADER, cpu_load, dump, machine, server, stats  # noqa: E402
from _player import Player  # noqa: E402

PROMPTS = [
    "Hello! Who are you?",
    "Tell me something about the ocean.",
    "How do I make a cup of tea?",
    "Give me a fun fact about space.",
    "Why is the sky blue?",
    "What is your favourite colour?",
    "What can you do for me?",
    "What is the weather like on Mars?",
    "Tell me about trees.",
    "How do birds fly?",
]
REMOTE_REPLY = ("Sure, here is a short answer for you. The sea covers most of our planet, and it is deep and old. "
                "Many creatures live there, from tiny plankton to huge whales. People have sailed it for thousands "
                "of years, and we still have not explored most of it.")


VOICE = False  # --voice: every session speaks its question (Piper speech fed in real time) instead of typing


async def session(base: str, prompt: str, start_at: float, result: dict[str, Any]) -> None:
    await asyncio.sleep(max(0.0, start_at - 0.4 - time.perf_counter()))
    opened = time.perf_counter()
    async with connect(f"ws://{base}/ws", max_size=None, open_timeout=30) as ws:
        while True:
            e = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if e["type"] == "session":
                break
            if e["type"] == "error":
                result["refused"] = e.get("code")
                result["refused_ms"] = (time.perf_counter() - opened) * 1000
                return
        feeder = None
        if VOICE:
            from tests.support.speech import feed_realtime, piper_16k, silence

            await ws.send(json.dumps({"type": "mic_start"}))
            speech = piper_16k(prompt)
            loud = np.flatnonzero(np.abs(speech) > 0.01)
            speech = speech[: int(loud[-1]) + 1]
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            await feed_realtime(ws, np.concatenate([silence(0.2), speech]))
            t0 = time.perf_counter()  # the end of the person's speech
            feeder = asyncio.create_task(feed_realtime(ws, silence(1.5)))
        else:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "user_text", "text": prompt}))
        player = Player(300)
        first_text = None
        turn_id = None
        while True:
            msg = await asyncio.wait_for(ws.recv(), 180)
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if turn_id is not None and HEADER.unpack_from(msg)[3] == turn_id:
                    player.feed(msg[HEADER.size :], now)
                continue
            e = json.loads(msg)
            if e["type"] == "turn_start":
                turn_id = e["turn_id"]
            elif e["type"] == "text_delta" and first_text is None:
                first_text = now
            elif e["type"] == "error":
                result["error"] = e.get("code")
            elif e["type"] == "turn_done" and e["turn_id"] == turn_id:
                break
        if feeder is not None:
            await feeder
        result.update(
            first_text_ms=None if first_text is None else (first_text - t0) * 1000,
            first_video_ms=None if player.first_at is None else (player.first_at - t0) * 1000,
            media_ms=player.media_ms, stalls=player.stalls, stall_ms=player.stall_ms, stall_at=player.stall_at,
            turn_ms=(time.perf_counter() - t0) * 1000,
        )


def big_webp() -> bytes:
    """A ~39-megapixel WebP of a public-domain face (skimage's astronaut, scaled up): small on the wire,
    heavy to decode and to search for a face."""
    import cv2
    from skimage import data

    image = cv2.resize(data.astronaut(), (7200, 5400), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".webp", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 30])
    assert ok
    return buf.tobytes()


async def upload_all(base: str, k: int, data: bytes, tag: str) -> list[float]:
    """``k`` avatar uploads at once (background work for the server); each one's time, then deleted."""
    async with httpx.AsyncClient(base_url=f"http://{base}", timeout=300) as c:
        async def one(i: int) -> float:
            t = time.perf_counter()
            r = await c.post("/api/avatar/add", data={"name": f"up{tag}x{i}"}, files={"file": ("big.webp", data, "image/webp")})
            took = time.perf_counter() - t
            if r.status_code == 201:
                await c.post("/api/avatar/delete", json={"name": f"up{tag}x{i}"})
            return took if r.status_code in (201, 422) else float("nan")

        return list(await asyncio.gather(*(one(i) for i in range(k))))


async def run(base: str, pid: int, n: int, mode: str, stagger_s: float, offset: int,
              uploads: int = 0, upload_data: bytes = b"") -> dict[str, Any]:
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    me = psutil.Process()  # the clients (and the loopback LLM): load on the same cores that a deployment has not
    me.cpu_percent(None)
    start = time.perf_counter() + 0.5
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    rss_peak = 0.0

    async def sample() -> None:
        nonlocal rss_peak
        while True:
            rss_peak = max(rss_peak, proc.memory_info().rss / 2**20)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    up = asyncio.create_task(upload_all(base, uploads, upload_data, str(offset))) if uploads else None
    t = time.perf_counter()
    await asyncio.gather(*(session(base, PROMPTS[(offset + i) % len(PROMPTS)],
                                   start + (i * stagger_s if mode == "staggered" else 0.0), results[i])
                           for i in range(n)))
    wall = time.perf_counter() - t
    upload_s = await up if up is not None else []
    sampler.cancel()
    return {"sessions": results, "cpu_cores": proc.cpu_percent(None) / 100, "wall_s": wall, "rss_peak_mb": rss_peak,
            "upload_s": upload_s, "client_cores": me.cpu_percent(None) / 100}


def busy_by_kind(base: str) -> dict[str, float]:
    """The server's CPU-slot seconds so far, by kind of unit (render, tts, llm, asr...), and the CPU time of the
    units' own threads (less when they wait for a core or the GIL), from /metrics."""
    text = httpx.get(f"http://{base}/metrics", timeout=10).text
    found = re.findall(r'^avatarchat_cpu_busy_seconds_total\{kind="([^"]+)"\} ([0-9.e+-]+)$', text, re.M)
    frames = re.search(r"^avatarchat_frames_total ([0-9.e+-]+)$", text, re.M)
    own = re.findall(r'^avatarchat_cpu_thread_seconds_total\{kind="([^"]+)"\} ([0-9.e+-]+)$', text, re.M)
    return {**{kind: float(value) for kind, value in found}, **{f"{kind} (own CPU)": float(v) for kind, v in own},
            "frames": float(frames.group(1)) if frames else 0.0}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    ap.add_argument("--rounds", type=int, default=3, help="runs per N (sessions × rounds samples)")
    ap.add_argument("--mode", choices=["burst", "staggered", "both"], default="both")
    ap.add_argument("--stagger-s", type=float, default=1.0)
    ap.add_argument("--llm", choices=["embedded", "openai"], default="embedded")
    ap.add_argument("--tok-s", type=float, default=40.0, help="the loopback LLM's streaming rate (--llm openai)")
    ap.add_argument("--load", type=float, default=0.0, help="other CPU load beside the server, in cores")
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--uploads", type=int, default=0, help="avatar uploads of a 39 MP WebP started with each round")
    ap.add_argument("--voice", action="store_true", help="sessions speak their question instead of typing it")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    global VOICE
    VOICE = args.voice
    if VOICE:
        from tests.support.speech import piper_16k

        for p in PROMPTS:
            piper_16k(p)  # synthesize the test speech before timing anything

    env = {"AVATARCHAT_SESSION__MAX_SESSIONS": str(max(args.sessions) + 2),
           "AVATARCHAT_AVATAR__MAX_UPLOAD_BYTES": str(50 * 2**20),
           "AVATARCHAT_LLM__MAX_TOKENS": str(args.max_tokens)}
    upstream = None
    if args.llm == "openai":
        from tests.support.openai_server import Behaviour, OpenAITestServer

        upstream = OpenAITestServer().start()
        upstream.behaviour = Behaviour(reply=REMOTE_REPLY, token_delay_s=1 / args.tok_s, first_token_delay_s=0.15)
        env.update(AVATARCHAT_LLM__ENGINE="openai", AVATARCHAT_LLM__OPENAI__BASE_URL=upstream.base_url,
                   AVATARCHAT_LLM__OPENAI__MODEL="bench")
    out: dict[str, Any] = {"llm": args.llm, "load": args.load, "uploads": args.uploads, "runs": {}}
    upload_data = big_webp() if args.uploads else b""
    modes = ["burst", "staggered"] if args.mode == "both" else [args.mode]
    print(f"capacity: {machine()}, llm {args.llm}, other load {args.load} core(s)")
    with server(env) as (base, proc):
        # Warm up: one turn, so that first-use costs are not counted.
        await session(base, PROMPTS[0], time.perf_counter(), {})
        with cpu_load(args.load):
            for mode in modes:
                for n in args.sessions:
                    rows: list[dict[str, Any]] = []
                    cpu, rss, uploaded, client = [], [], [], []
                    busy_before = busy_by_kind(base)
                    for r in range(args.rounds):
                        res = await run(base, proc.pid, n, mode, args.stagger_s, offset=r * n,
                                        uploads=args.uploads, upload_data=upload_data)
                        rows += res["sessions"]
                        uploaded += res["upload_s"]
                        cpu.append(res["cpu_cores"])
                        client.append(res["client_cores"])
                        rss.append(res["rss_peak_mb"])
                        await asyncio.sleep(1.0)
                    mon = httpx.get(f"http://{base}/api/monitor", params={"turns": 1}, timeout=10).json()
                    busy = {k: v - busy_before.get(k, 0.0) for k, v in busy_by_kind(base).items()}
                    fv = [s["first_video_ms"] for s in rows if s.get("first_video_ms") is not None]
                    stalls = sum(s.get("stalls", 0) for s in rows)
                    stalled_sessions = sum(1 for s in rows if s.get("stalls", 0))
                    errors = [s["error"] for s in rows if s.get("error")]
                    refused = [s["refused_ms"] for s in rows if s.get("refused")]
                    st = stats(fv) if fv else {}
                    key = f"{mode}-{n}"
                    out["runs"][key] = {"first_video_ms": st, "max_ms": max(fv) if fv else None, "stalls": stalls,
                                        "stalled_sessions": stalled_sessions, "samples": len(rows), "errors": errors,
                                        "refused": len(refused), "refused_ms_max": max(refused) if refused else None,
                                        "cpu_cores_mean": sum(cpu) / len(cpu), "rss_peak_mb": max(rss),
                                        "client_cores_mean": sum(client) / len(client),
                                        "stall_ms": sum(s.get("stall_ms", 0.0) for s in rows),
                                        "upload_s": uploaded,
                                        "capacity_sessions": mon.get("capacity_sessions"),
                                        "cost_per_speech_s": mon.get("cost_per_speech_s"),
                                        "degrade_level": mon.get("degrade_level"),
                                        "slot_seconds": {k: round(v, 2) for k, v in busy.items() if v > 0.005},
                                        "stall_detail": [(round(s.get("first_video_ms") or 0), s["stall_at"])
                                                         for s in rows if s.get("stall_at")]}
                    print(f"{mode:9} N={n}: first video p50 {st.get('p50', float('nan')):6.0f} ms  "
                          f"p95 {st.get('p95', float('nan')):6.0f} ms  max {max(fv) if fv else float('nan'):6.0f} ms  "
                          f"stalls {stalls} in {stalled_sessions}/{len(rows)} sessions  errors {len(errors)}  "
                          + (f"server_busy {len(refused)} (≤ {max(refused):.0f} ms)  " if refused else "") +
                          f"server CPU {sum(cpu) / len(cpu):.2f} cores (bench clients {sum(client) / len(client):.2f})  "
                          f"RSS {max(rss):.0f} MB  "
                          f"capacity {mon.get('capacity_sessions')} (cost {mon.get('cost_per_speech_s')})  "
                          f"degraded {mon.get('degrade_level')}"
                          + (f"  uploads {len(uploaded)} took up to {max(uploaded):.1f} s" if uploaded else ""), flush=True)
                    video_s = max(busy.pop("frames", 0.0) / 25, 1e-9)  # the bench's streams run at 25 fps
                    print(f"          slot-seconds per second of video ({video_s:.0f} s), by kind: " + ", ".join(
                        f"{k} {v / video_s:.3f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v > 0.005),
                        flush=True)
    if upstream is not None:
        upstream.stop()
    dump(args.name or f"capacity_{args.llm}" + ("_voice" if args.voice else "")
         + (f"_load{args.load:g}" if args.load else "") + (f"_uploads{args.uploads}" if args.uploads else ""), out)


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    asyncio.run(main())
