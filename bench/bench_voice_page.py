"""Recognition through the page's capture vs straight to the server, per combination of Chromium's processing.

The same mic audio (12 held-out questions, each in a Piper and an espeak voice: 24 utterances) is
(a) streamed as 16 kHz PCM over the session WebSocket in real time, and (b) played by Chromium's fake
microphone into the real web app (at /, the mic button clicked), with echoCancellation, noiseSuppression
and autoGainControl set in localStorage before the page loads. Conditions: clean; white noise over the
whole file at 20 dB SNR; echo (an unrelated Piper reply under each question at -6 dB, as the avatar heard
through speakers; mixed into the file, not played, so Chromium's echo canceller has no reference for it:
this shows what the processing costs the question, not what cancellation removes). WER is over all 24
utterances' words (the finals concatenated in order, so a dropped, split or merged utterance counts).
Also: end of speech → first painted frame on the page (the client's requestVideoFrameCallback figure, as
bench_web.py reads it) and the load average.

    PYTHONPATH=src:. .venv/bin/python bench/bench_voice_page.py   # all 8 on clean, 4 on noise/echo (~35 min)
    ... bench_voice_page.py --all                                 # all 8 everywhere (~twice as long)

PARALLEL (default 2) pages run at once; each run is ~3 minutes of audio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import dump, machine, server, stats  # noqa: E402
from tests.support.chromium import launch  # noqa: E402
from tests.support.speech import (  # noqa: E402
    RATE, espeak_16k, feed_realtime, piper_16k, silence, word_errors, write_wav,
)

STORAGE_KEY = "avatarchat.settings.v1"  # web/src/stores/settings.ts
FLAGS = ("echoCancellation", "noiseSuppression", "autoGainControl")
COMBOS = [dict(zip(FLAGS, c)) for c in itertools.product((False, True), repeat=3)]
GAP_S = 4.5  # after each question: end of turn, transcript, the first frame of the reply
QUESTIONS = [
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Can you explain how a rainbow forms?",
    "Which planet is closest to the sun?",
    "What should I pack for a weekend camping trip?",
    "Why do leaves change color in autumn?",
    "What is the difference between a frog and a toad?",
    "Could you suggest a healthy breakfast for tomorrow?",
    "Who painted the famous picture of the starry night?",
    "How does a refrigerator keep food cold?",
    "What games can children play on a rainy day?",
    "Is it safe to swim in the ocean after eating?",
]
REPLIES = [  # the avatar's own voice, for the echo condition
    "Sure, here is a short answer for you. The sea is deep and very old, and most of it is still unexplored.",
    "That is a lovely question. Many people enjoy a quiet walk in the park when the weather is warm.",
    "I think the best idea is to start small, take your time, and ask a friend to help you along the way.",
]


def name(flags: dict[str, bool]) -> str:
    return "+".join(k[:1].upper() + k[1:4] for k, v in flags.items() if v) or "none"  # e.g. Echo+Nois


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def mic_audio(condition: str) -> tuple[np.ndarray, list[str]]:
    """The microphone's signal for a condition, and the 24 questions said in it, in order."""
    utts = [(q, piper_16k(q)) for q in QUESTIONS] + [(q, espeak_16k(q)) for q in QUESTIONS]
    parts, texts = [silence(1.0)], []
    for i, (text, speech) in enumerate(utts):
        speech = np.array(speech, np.float32)
        if condition == "echo":  # the avatar's reply, from half a second before the question to its end
            lead = int(0.5 * RATE)
            reply = np.resize(piper_16k(REPLIES[i % len(REPLIES)]), lead + len(speech))
            speech = np.concatenate([np.zeros(lead, np.float32), speech])
            speech += reply * (rms(speech[lead:]) / rms(reply) * 10 ** (-6 / 20))
        parts += [speech, silence(GAP_S)]
        texts.append(text)
    audio = np.concatenate(parts)
    if condition == "noise":
        level = rms(np.concatenate([u for _, u in utts])) / 10  # 20 dB below the speech
        audio = audio + np.random.default_rng(20).normal(0, level, len(audio)).astype(np.float32)
    return audio / max(1.0, float(np.abs(audio).max()) / 0.95), texts


def wer(texts: list[str], heard: list[str]) -> tuple[float, int]:
    edits, n = word_errors(" ".join(texts), " ".join(heard))
    return edits / n, n


async def direct(base: str, audio: np.ndarray) -> list[str]:
    """The final transcripts of ``audio`` sent straight over the session WebSocket."""
    finals: list[str] = []
    async with connect(f"ws://{base}/ws", max_size=None) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "mic_start", "sample_rate": RATE, "format": "pcm_s16le"}))

        async def reader() -> None:
            async for msg in ws:
                e = json.loads(msg) if isinstance(msg, str) else {}
                if e.get("type") == "transcript" and e.get("final") and e.get("text"):
                    finals.append(e["text"])

        task = asyncio.create_task(reader())
        await feed_realtime(ws, np.concatenate([audio, silence(3.0)]))
        await asyncio.sleep(3)
        task.cancel()
    return finals


def page(base: str, wav: Path, seconds: float, flags: dict[str, bool]) -> dict[str, object]:
    """The app in Chromium, its mic playing ``wav``: what it heard, the processing applied, the first frames."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw, wav)
        ctx = b.new_context(locale="en-US")
        ctx.add_init_script(f"localStorage.setItem({json.dumps(STORAGE_KEY)}, {json.dumps(json.dumps(flags))})")
        p = ctx.new_page()
        p.goto(f"http://{base}/")
        p.wait_for_function("window.avatarChat && window.avatarChat.sessionId", timeout=60_000)
        p.click("[data-testid=mic]")
        p.wait_for_function("window.avatarChat.micOn", timeout=10_000)
        applied = p.evaluate("window.avatarChat.micSettings")
        p.wait_for_timeout((seconds + 4) * 1000)
        heard = p.evaluate("window.avatarChat.heard")
        # The client's figures: last voiced mic frame → first frame painted (requestVideoFrameCallback).
        frames = p.evaluate("window.avatarChat.turns.filter(t => t.voice && t.speechEndAt && t.firstFrameAt)"
                            ".map(t => t.firstFrameAt - t.speechEndAt)")
        b.close()
    return {"heard": heard, "applied": {k: applied.get(k) for k in FLAGS}, "first_frame_ms": frames}


class Load:
    """The 1-minute load average, sampled every 10 s while the bench runs."""

    def __init__(self) -> None:
        self.before = os.getloadavg()
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(10):
            self.samples.append(os.getloadavg()[0])

    def done(self) -> dict[str, object]:
        self._stop.set()
        return {"before": self.before, "during_mean": float(np.mean(self.samples or [0])),
                "during_max": max(self.samples or [0]), "after": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="all 8 combinations on noise and echo too")
    ap.add_argument("--parallel", type=int, default=int(os.environ.get("PARALLEL", "2")))
    args = ap.parse_args()
    load = Load()
    print(f"machine: {machine()}; load average before {load.before} (other work on the machine)", flush=True)
    results: dict[str, dict[str, object]] = {}
    env = {"AVATARCHAT_LLM__MAX_TOKENS": "32", "AVATARCHAT_SESSION__MAX_SESSIONS": "6",
           "AVATARCHAT_SESSION__ADMISSION": "fixed"}
    with tempfile.TemporaryDirectory() as tmp, server({**env, "AVATARCHAT_AVATAR__DIR": tmp}) as (base, _):
        mics = {c: mic_audio(c) for c in ("clean", "noise", "echo")}
        wavs = {c: write_wav(Path(tmp) / f"{c}.wav", a) for c, (a, _) in mics.items()}

        async def all_direct() -> list[list[str]]:
            return await asyncio.gather(*(direct(base, a) for a, _ in mics.values()))

        for c, heard in zip(mics, asyncio.run(all_direct())):
            w, n = wer(mics[c][1], heard)
            results[c] = {"direct": {"wer": w, "words": n, "heard": heard}, "page": {}}
            print(f"direct {c:5}: WER {w:.3f} ({len(heard)} finals)", flush=True)

        def run(c: str, flags: dict[str, bool]) -> None:
            r = page(base, wavs[c], len(mics[c][0]) / RATE, flags)
            r["wer"], r["words"] = wer(mics[c][1], r["heard"])  # type: ignore[arg-type]
            results[c]["page"][name(flags)] = {**r, "flags": flags}  # type: ignore[index]
            print(f"page   {c:5} {name(flags):15}: WER {r['wer']:.3f} ({len(r['heard'])} finals), "  # type: ignore[arg-type]
                  f"applied {r['applied']}", flush=True)

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda f: run("clean", f), COMBOS))
            clean = results["clean"]["page"]
            # Noise and echo: no processing, echo cancellation alone, all on (the old default), the best other.
            pick = [COMBOS[0], COMBOS[4], COMBOS[7]]
            pick += sorted((f for f in COMBOS if f not in pick), key=lambda f: clean[name(f)]["wer"])[:1]  # type: ignore[index]
            later = COMBOS if args.all else pick
            list(pool.map(lambda cf: run(*cf), [(c, f) for c in ("noise", "echo") for f in later]))
    loadavg = load.done()
    frames = [ms for cond in results.values() for r in cond["page"].values() for ms in r["first_frame_ms"]]  # type: ignore[attr-defined]
    print_table(results)
    ff = stats(frames) if frames else {}
    if ff:
        print(f"\nend of speech → first painted frame (page, all runs): p50 {ff['p50']:.0f} ms  p95 {ff['p95']:.0f} ms  n={ff['n']}")
    print(f"load average: before {loadavg['before']}, during mean {loadavg['during_mean']:.2f} max "
          f"{loadavg['during_max']:.2f}, after {loadavg['after']} ({os.cpu_count()} cores)")
    dump("voice_page", {"utterances": 2 * len(QUESTIONS), "gap_s": GAP_S, "first_frame": ff, "load": loadavg,
                        "results": results})
    return 0


def print_table(results: dict[str, dict[str, object]]) -> None:
    conds = list(results)
    print(f"\nWER over {2 * len(QUESTIONS)} utterances (12 questions × Piper, espeak); page / direct in brackets")
    print(f"{'processing':16}" + "".join(f"{c:>22}" for c in conds) + f"{'first frame p50/p95':>24}")
    print(f"{'direct (no page)':16}" + "".join(f"{results[c]['direct']['wer']:>22.3f}" for c in conds))  # type: ignore[index]
    for f in COMBOS:
        cells, frames = "", []
        for c in conds:
            r = results[c]["page"].get(name(f))  # type: ignore[attr-defined]
            if r is None:
                cells += f"{'—':>22}"
                continue
            d = results[c]["direct"]["wer"]  # type: ignore[index]
            cells += f"{r['wer']:>13.3f} ({r['wer'] / d if d else float('inf'):5.2f}x)"
            frames += r["first_frame_ms"]
        ff = stats(frames) if frames else None
        print(f"{name(f):16}" + cells + (f"{ff['p50']:>15.0f} / {ff['p95']:.0f} ms" if ff else ""))


if __name__ == "__main__":
    sys.exit(main())
