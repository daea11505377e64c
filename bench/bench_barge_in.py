"""Barge-in: how fast the avatar stops when the person talks over it, and whether its own voice ever stops it.

Each trial is a new session on the real server. The replies play into the session's microphone as speakers in a
room would return them (tests/support/echo_room.py: delayed 40–250 ms, -12 to -3 dB, reverb RT60 0.15–0.5 s):
- echo trials: a question is typed, the reply plays to its end into the mic. A false barge-in is any
  ``speech_start``, ``interrupt`` or transcript during it.
  Then, a second after the reply ended, the person asks a question: it must be heard (a final transcript).
- barge-in trials: 1.0–3.0 s into the reply the person asks something else (Piper or espeak-ng), over the
  echo in half the trials, with headphones (no echo) in the other half. Measured: from the first sample of
  their speech (above -34 dBFS) to the ``interrupt`` event, on which the page stops the video.
Modes: ``check`` (the echo check with the transcript veto, the default), ``bands`` (the band fit alone:
``voice.echo_words_check: false``), ``guard`` (``voice.echo_check: false``: the fixed 500 ms guard before).
``--parallel N`` runs N trials at once, each its own session (several conversations on one server).

    .venv/bin/python bench/bench_barge_in.py [--echo-trials 20] [--barge-trials 20] [--load 0.5] [--parallel 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_load, dump, machine, server, stats, summary  # noqa: E402
from tests.support.echo_room import SpeakerMic  # noqa: E402
from tests.support.speech import espeak_16k, piper_16k  # noqa: E402
from tests.support.voice_client import voice_client  # noqa: E402

PROMPTS = [
    "Tell me a story about a dragon who learns to bake bread.",
    "Describe a walk through a forest in autumn.",
    "Tell me about the history of the bicycle.",
    "Explain how a rainbow forms.",
    "Tell me a story about a lighthouse keeper and a storm.",
    "What is it like to live on a small island?",
    "Describe your favourite kind of weather and why.",
    "Tell me about the life of honey bees.",
]
INTERRUPTIONS = [
    "Stop, tell me about the sun instead.",
    "Wait, what time is it in Tokyo?",
    "Hold on, can you repeat the last part?",
    "No, I meant something else entirely.",
    "Sorry, how do I cook rice?",
]


def room(rng: np.random.Generator, seed: int) -> dict[str, float]:
    return {"delay_ms": float(rng.uniform(40, 250)), "gain_db": float(rng.uniform(-12, -3)),
            "rt60_s": float(rng.uniform(0.15, 0.5)), "seed": seed}


async def echo_trial(url: str, prompt: str, question: np.ndarray, acoustics: dict[str, float]) -> dict[str, object]:
    c = await voice_client(SimpleNamespace(ws=url))
    c.speaker = SpeakerMic(c.ws, **acoustics).start()  # type: ignore[arg-type]
    try:
        await c.send(type="user_text", text=prompt)
        _, start = await c.wait_for("turn_start")
        _, done = await c.wait_for("turn_done", turn_id=start["turn_id"], timeout=180)
        first = c.media_at.get(start["turn_id"], [time.perf_counter()])[0]
        await asyncio.sleep(max(0.0, first + done["media_ms"] / 1000 + 1.0 - time.perf_counter()))
        kinds = [k for _, k, _ in c.log]
        false = any(k in ("speech_start", "interrupt", "transcript") for k in kinds)
        mark = len(c.log)
        c.speaker.say(question)
        try:
            await c.wait_for("transcript", after=mark, final=True, timeout=15)
            heard = True
        except TimeoutError:
            heard = False
        return {"false_barge_in": false, "media_ms": done["media_ms"], "heard_after": heard, **acoustics}
    finally:
        await c.speaker.close()
        await c.close()


async def barge_trial(url: str, prompt: str, voice: np.ndarray, at_s: float,
                      acoustics: dict[str, float]) -> dict[str, object]:
    c = await voice_client(SimpleNamespace(ws=url))
    c.speaker = SpeakerMic(c.ws, **acoustics).start()  # type: ignore[arg-type]
    try:
        await c.send(type="user_text", text=prompt)
        _, start = await c.wait_for("turn_start")
        turn = start["turn_id"]
        await c.wait_for("media_start", turn_id=turn, timeout=60)
        await asyncio.sleep(at_s)
        mark = len(c.log)
        c.speaker.say(voice)
        try:
            t_int, _ = await c.wait_for("interrupt", after=mark, timeout=8)
        except TimeoutError:
            return {"interrupted": False, "at_s": at_s, **acoustics}
        assert c.speaker.voice_started is not None
        onset = c.speaker.voice_started + int(np.argmax(np.abs(voice) > 0.02)) / 16000
        return {"interrupted": True, "at_s": at_s, "stop_ms": (t_int - onset) * 1000, **acoustics}
    finally:
        await c.speaker.close()
        await c.close()


async def run_mode(url: str, args: argparse.Namespace, voices: list[np.ndarray]) -> dict[str, object]:
    rng = np.random.default_rng(7)
    k = args.parallel
    echoes: list[dict[str, object]] = []
    for lo in range(0, args.echo_trials, k):
        batch = [(i, room(rng, i)) for i in range(lo, min(lo + k, args.echo_trials))]
        for i, r in zip([i for i, _ in batch], await asyncio.gather(
                *(echo_trial(url, PROMPTS[i % len(PROMPTS)], voices[i % len(voices)], a) for i, a in batch))):
            echoes.append(r)
            print(f"  echo {i + 1:2d}: false barge-in {r['false_barge_in']}  question after heard {r['heard_after']}  "
                  f"reply {float(r['media_ms']) / 1000:4.1f} s  delay {r['delay_ms']:3.0f} ms gain {r['gain_db']:5.1f} dB "
                  f"RT60 {r['rt60_s']:.2f} s", flush=True)
    barges: list[dict[str, object]] = []
    for lo in range(0, args.barge_trials, k):
        batch = []
        for i in range(lo, min(lo + k, args.barge_trials)):
            acoustics = room(rng, 100 + i)
            if i % 2:
                acoustics["gain_db"] = -120.0  # headphones: no echo
            batch.append((i, acoustics, float(rng.uniform(1.0, 3.0))))
        results = await asyncio.gather(*(barge_trial(url, PROMPTS[(i + 3) % len(PROMPTS)], voices[i % len(voices)], at, a)
                                         for i, a, at in batch))
        for (i, _, _), r in zip(batch, results):
            barges.append(r)
            print(f"  barge {i + 1:2d} ({'headphones' if i % 2 else 'speakers  '}): "
                  + (f"stop {r['stop_ms']:5.0f} ms" if r["interrupted"] else "NOT interrupted") + f" at {r['at_s']:.1f} s",
                  flush=True)
    stops = [float(r["stop_ms"]) for r in barges if r["interrupted"]]  # type: ignore[arg-type]
    return {
        "false_barge_ins": sum(bool(r["false_barge_in"]) for r in echoes), "echo_trials": len(echoes),
        "not_heard_after": sum(not r["heard_after"] for r in echoes),
        "missed": sum(not r["interrupted"] for r in barges), "barge_trials": len(barges),
        "stop_ms": stats(stops) if stops else None, "echo": echoes, "barge": barges,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--echo-trials", type=int, default=20)
    ap.add_argument("--barge-trials", type=int, default=20)
    ap.add_argument("--load", type=float, default=0.0, help="cores of other work on the machine meanwhile")
    ap.add_argument("--modes", default="check,bands,guard")
    ap.add_argument("--parallel", type=int, default=1, help="trials (sessions) at once")
    args = ap.parse_args()
    voices = [piper_16k(t) for t in INTERRUPTIONS] + [espeak_16k(t) for t in INTERRUPTIONS]
    env = {"AVATARCHAT_LLM__MAX_TOKENS": "64"}
    results: dict[str, object] = {}
    print(f"machine: {machine()}; other load: {args.load} cores; {args.parallel} session(s) at once")
    modes = {"check": {}, "bands": {"AVATARCHAT_VOICE__ECHO_WORDS_CHECK": "false"},
             "guard": {"AVATARCHAT_VOICE__ECHO_CHECK": "false"}}
    for mode in args.modes.split(","):
        print(f"{mode}: {modes[mode] or 'defaults'}")
        with server({**env, "AVATARCHAT_SESSION__ADMISSION": "fixed", **modes[mode]}) as (base, _), cpu_load(args.load):
            results[mode] = asyncio.run(run_mode(f"ws://{base}/ws", args, voices))
    print()
    for mode, r in results.items():
        assert isinstance(r, dict)
        print(f"{mode:5s}: false barge-ins {r['false_barge_ins']}/{r['echo_trials']} echo trials; "
              f"questions after the reply not heard {r['not_heard_after']}/{r['echo_trials']}; "
              f"missed barge-ins {r['missed']}/{r['barge_trials']}")
        for label, phones in (("all", None), ("speakers", False), ("headphones", True)):
            stops = [float(b["stop_ms"]) for b in r["barge"]  # type: ignore[union-attr]
                     if b["interrupted"] and (phones is None or (b["gain_db"] < -100) == phones)]
            if stops:
                print(f"       speech onset → interrupt, {label:10s}: {summary(stops)}")
    check, guard = results.get("check"), results.get("guard")
    if isinstance(check, dict) and isinstance(guard, dict) and check["stop_ms"] and guard["stop_ms"]:
        print(f"stop time p50, check / guard: {check['stop_ms']['p50'] / guard['stop_ms']['p50']:.2f}")
    dump("barge_in", {"load": args.load, "parallel": args.parallel, **results})


if __name__ == "__main__":
    main()
