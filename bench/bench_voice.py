"""Voice latency: end of the person's speech (last voiced sample fed) → first video fragment of the reply.

Real speech (Piper) is streamed to the real server as 16 kHz PCM in real time, with the default
silence window, through the WebSocket a browser uses. Per utterance the server's own breakdown is
printed too: the end-of-turn silence, ASR, the LLM's first clause, TTS of the first piece, render.

    .venv/bin/python bench/bench_voice.py [--utterances 24]

Each question is asked after the previous reply has finished playing (real time), as a person who
does not interrupt would; replies are capped at 48 tokens so the run takes minutes, not half an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import HEADER, dump, machine, server, stats, summary  # noqa: E402
from tests.support.speech import feed_realtime, piper_16k, silence  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Can you tell me a joke?",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Why do cats purr?",
    "Tell me something interesting about octopuses.",
    "What is your favourite book?",
    "How do airplanes stay in the air?",
    "What is the best way to learn a language?",
    "Can you recommend a good movie?",
    "What time is it in Tokyo?",
    "How do I make pancakes?",
]


def voiced_end(audio: np.ndarray) -> int:
    """Index just after the last sample louder than -40 dBFS: where the speech really stops."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return int(loud[-1]) + 1 if len(loud) else len(audio)


async def one(ws, text: str, turn_hint: int, speech: np.ndarray | None = None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One spoken question (``speech``, by default Piper saying ``text``) and its reply's timings."""
    speech = piper_16k(text) if speech is None else speech
    cut = voiced_end(speech)
    got: dict[str, float] = {}
    transcript: dict = {}
    done: dict = {}
    turn_id: int | None = None

    async def reader() -> None:
        nonlocal turn_id, transcript, done
        async for msg in ws:
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if turn_id is not None and HEADER.unpack_from(msg)[3] == turn_id and "first_video" not in got:
                    got["first_video"] = now
                continue
            e = json.loads(msg)
            if e["type"] == "transcript" and e["final"]:
                transcript = e
                got["transcript"] = now
            elif e["type"] == "turn_start":
                turn_id = e["turn_id"]
            elif e["type"] == "turn_done" and e["turn_id"] == turn_id:
                done = e
                return

    task = asyncio.create_task(reader())
    await feed_realtime(ws, np.concatenate([silence(0.3), speech[:cut]]))
    speech_end = time.perf_counter()
    await feed_realtime(ws, silence(1.2))
    await asyncio.wait_for(task, 120)
    # A polite listener: the next question comes once the avatar has finished speaking (no barge-in).
    rest = got["first_video"] + done["media_ms"] / 1000 + 0.3 - time.perf_counter()
    if rest > 0:
        await feed_realtime(ws, silence(rest))
    t = done["timings"]
    v = transcript.get("timings", {})
    return {
        "end_to_first_video": (got["first_video"] - speech_end) * 1000,
        "end_to_transcript": (got["transcript"] - speech_end) * 1000,
        "endpoint": float(v.get("endpoint_ms", 0)),
        "asr": float(v.get("asr_ms", 0)),
        "asr_wait_after_endpoint": float(v.get("asr_wait_ms", 0)),
        "llm_first_clause": float(t.get("first_piece", 0)),
        "tts_first_piece": float(t.get("first_audio", 0) - t.get("first_piece", 0)),
        "render_first_frames": float(t.get("first_video", 0) - t.get("first_audio", 0)),
        "speculative": float(bool(v.get("speculative"))),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utterances", type=int, default=24)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    for q in QUESTIONS:
        piper_16k(q)  # synthesize the test speech before timing anything
    rows: list[dict[str, float]] = []
    # Short replies: the figure is about the first frame, and each question waits for the reply to end.
    with server({"AVATARCHAT_LLM__MAX_TOKENS": "48"}) as (base, _proc):
        async with connect(f"ws://{base}/ws", max_size=None) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "mic_start"}))
            json.loads(await ws.recv())
            await one(ws, "Hello there.", 0)  # warm-up
            for i in range(args.utterances):
                rows.append(await one(ws, QUESTIONS[i % len(QUESTIONS)], i))
                print(f"  {i:2d} end→first video {rows[-1]['end_to_first_video']:6.0f} ms "
                      f"(endpoint {rows[-1]['endpoint']:.0f}, asr {rows[-1]['asr']:.0f}, "
                      f"llm {rows[-1]['llm_first_clause']:.0f}, tts {rows[-1]['tts_first_piece']:.0f}, "
                      f"render {rows[-1]['render_first_frames']:.0f}, speculative {bool(rows[-1]['speculative'])})",
                      flush=True)
    keys = list(rows[0])
    print(f"\n{len(rows)} utterances, default silence window; ms from the last voiced sample fed:")
    for k in keys:
        if k != "speculative":
            print(f"  {k:26} {summary([r[k] for r in rows])}")
    print(f"  speculative replies used: {sum(r['speculative'] for r in rows):.0f}/{len(rows)}")
    dump("voice", {k: stats([r[k] for r in rows]) for k in keys})


if __name__ == "__main__":
    asyncio.run(main())
