"""Web app (issue 4): send → first avatar frame painted in the browser, against the server's first-video figure.

In Debian's Chromium (headless, via web/ and Node playwright-core), for text turns the time from pressing send to
the first frame painted (requestVideoFrameCallback), and for voice turns (a Piper voice on the fake microphone)
from the end of the speech (the last mic frame above the voice level, in the browser) to the first frame; and
barge-ins (a question over a long answer) from the onset of the speech, as the page's mic hears it, to the video
stopping (the page's interrupt handler), with no echo (Chromium's fake mic does not hear the page). The
baseline is the server's `first_video` timing of the same turns (user message received → first fMP4 fragment
sent); the target is browser p50 ≤ server p50 + 100 ms for text turns.

    .venv/bin/python bench/bench_web.py     # TURNS=12 text turns, VOICE_TURNS=10, BARGE_TURNS=10 (VOICE=0, BARGE=0 skip)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import dump, machine, server, stats, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TURNS = int(os.environ.get("TURNS", "12"))
QUESTIONS = [
    "What is the tallest mountain in the world?",
    "Tell me about the moon.",
    "What do cats like to eat?",
    "Why is the sky blue?",
]


def voice_wav(path: Path, n: int) -> None:
    from tests.support.speech import piper_16k, silence, write_wav

    parts = [silence(1.0)]
    for i in range(n):
        parts += [piper_16k(QUESTIONS[i % len(QUESTIONS)]), silence(11.0)]
    write_wav(path, np.concatenate(parts))


LONG = ["Tell me a long story about a dragon and a knight.", "Describe a long walk through a forest in autumn.",
        "Tell me all about the history of the bicycle."]
CUTS = ["Wait, what is the capital of France?", "Stop, tell me about the sun instead.", "Sorry, how do I cook rice?"]


def barge_wav(path: Path, n: int) -> None:
    """Each cycle: a question with a long answer, 2.5 s (the answer starts playing), another question over it."""
    from tests.support.speech import piper_16k, silence, write_wav

    parts = [silence(1.0)]
    for i in range(n):
        parts += [piper_16k(LONG[i % len(LONG)]), silence(2.5), piper_16k(CUTS[i % len(CUTS)]), silence(12.0)]
    write_wav(path, np.concatenate(parts))


def run(base: str, mode: str, turns: int, wav: Path | None = None) -> list[dict[str, float]]:
    env = {**os.environ, "AVATARCHAT_URL": f"http://{base}", "MODE": mode, "TURNS": str(turns), "WARMUP": "2"}
    if wav is not None:
        env["BENCH_WAV"] = str(wav)
    out = subprocess.run(["node", str(ROOT / "bench" / "bench_web.mjs")], env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r for r in rows if not r["warmup"]]


def report(mode: str, rows: list[dict[str, float]]) -> dict[str, object]:
    browser = [r["browser_first_frame_ms"] for r in rows]
    media = [r["browser_first_media_ms"] for r in rows]
    srv = [r["server_first_video_ms"] for r in rows]
    over = [b - s for b, s in zip(browser, srv)]
    print(f"\n{mode} turns ({len(rows)}, after 2 warm-up turns)")
    print(f"  browser: first frame painted  {summary(browser)}")
    print(f"  browser: first media received {summary(media)}")
    print(f"  server:  first_video          {summary(srv)}")
    print(f"  browser − server, per turn    {summary(over)}")
    b50, s50 = float(np.percentile(browser, 50)), float(np.percentile(srv, 50))
    print(f"  p50 browser {b50:.0f} ms vs server {s50:.0f} ms: +{b50 - s50:.0f} ms (ratio {b50 / s50:.3f})")
    if mode == "voice":
        print("  (voice: browser figures run from the end of speech; the server's first_video runs from the start of "
              "its reply, after the end-of-turn silence and the ASR)")
    return {"browser_first_frame": stats(browser), "browser_first_media": stats(media), "server_first_video": stats(srv),
            "browser_minus_server": stats(over), "rows": rows}


def main() -> int:
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, server({"AVATARCHAT_AVATAR__DIR": tmp}) as (base, _):
        results["text"] = report("text", run(base, "text", TURNS))
        if os.environ.get("VOICE", "1") != "0":
            wav = Path(tmp) / "questions.wav"
            n = int(os.environ.get("VOICE_TURNS", "10")) + 2
            voice_wav(wav, n)
            results["voice"] = report("voice", run(base, "voice", n - 2, wav))
        if os.environ.get("BARGE", "1") != "0":
            wav = Path(tmp) / "barge.wav"
            n = int(os.environ.get("BARGE_TURNS", "10"))
            barge_wav(wav, n + 2)
            rows = run(base, "barge", n, wav)
            stops = [r["barge_stop_ms"] for r in rows if r["barge_stop_ms"] is not None]
            print(f"\nbarge-in ({len(rows)} interrupts, after 2 warm-up ones)")
            print(f"  browser: speech onset → video stopped {summary(stops)}")
            results["barge"] = {"stop_ms": stats(stops), "rows": rows}
    print(f"load average after: {os.getloadavg()}")
    dump("web", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
