"""Speakers next to the microphone: the avatar's replies come back into the mic, delayed, reverberant, quieter.

A ``SpeakerMic`` decodes each turn's fMP4 audio as it arrives, plays it from the moment its first fragment
arrived (as the test clients report playback), and feeds the session's microphone in real time with that sound
as a room would return it, plus whatever the person says. Chromium's fake microphone plays a fixed file, so it
cannot hear the page's own output; this puts the reply itself into the microphone.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field

import av
import numpy as np
from scipy.signal import fftconvolve

from tests.support.speech import RATE, frame, pcm16, to_16k

CHUNK = RATE // 50  # 20 ms frames


def decode_audio(fmp4: bytes) -> np.ndarray:
    """The audio track of an fMP4 stream (init segment and whole fragments), mono, 16 kHz."""
    if not fmp4:
        return np.zeros(0, np.float32)
    parts, rate = [], RATE
    with av.open(io.BytesIO(fmp4), "r") as box:
        if not box.streams.audio:
            return np.zeros(0, np.float32)
        for f in box.decode(audio=0):
            a = f.to_ndarray().astype(np.float32)
            parts.append(a.mean(0) if a.ndim == 2 and a.shape[0] > 1 else a.reshape(-1))
            rate = f.sample_rate
    return to_16k(np.concatenate(parts), rate) if parts else np.zeros(0, np.float32)


def room_response(rt60_s: float, seed: int) -> np.ndarray:
    """A room's impulse response: a direct path, then exponentially decaying reflections; unit energy."""
    rng = np.random.default_rng(seed)
    n = max(1, int(rt60_s * RATE))
    t = np.arange(n) / RATE
    h = 0.5 * rng.standard_normal(n) * np.exp(-6.9 * t / max(rt60_s, 1e-3))
    h[0] += 3.0
    return (h / np.sqrt((h * h).sum())).astype(np.float32)


@dataclass
class _Playing:
    started: float  # perf_counter() when its first fragment arrived
    data: list[bytes] = field(default_factory=list)
    stopped: float | None = None
    echo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    decoded_parts: int = 0


class SpeakerMic:
    """Feeds ``ws`` with 20 ms mic frames in real time: the room's echo of what plays, plus the person."""

    def __init__(self, ws, delay_ms: float = 100, gain_db: float = -6, rt60_s: float = 0.3,  # type: ignore[no-untyped-def]
                 noise_db: float = -60, seed: int = 0) -> None:
        self._ws = ws
        self._delay = delay_ms / 1000
        self._gain = 10 ** (gain_db / 20)
        self._h = room_response(rt60_s, seed)
        self._noise = 10 ** (noise_db / 20)
        self._rng = np.random.default_rng(seed)
        self._turns: dict[int, _Playing] = {}
        self._voice: list[np.ndarray] = []
        self._task: asyncio.Task[None] | None = None
        self.voice_started: float | None = None  # perf_counter() when the last ``say`` began to play

    def media(self, turn_id: int, data: bytes) -> None:
        """A media fragment arrived: it plays from the first fragment's arrival, for the turn's whole length."""
        playing = self._turns.get(turn_id)
        if playing is None:
            playing = self._turns[turn_id] = _Playing(time.perf_counter())
        playing.data.append(data)

    def stop(self, turn_id: int) -> None:
        """The client stopped playing ``turn_id`` (an interrupt)."""
        if turn_id in self._turns and self._turns[turn_id].stopped is None:
            self._turns[turn_id].stopped = time.perf_counter()

    def say(self, audio: np.ndarray) -> None:
        """The person speaks ``audio`` (16 kHz) from the next frame on."""
        self._voice.append(np.asarray(audio, np.float32))
        self.voice_started = None

    def start(self) -> SpeakerMic:
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _echo(self, playing: _Playing) -> np.ndarray:
        if playing.decoded_parts != len(playing.data):
            playing.decoded_parts = len(playing.data)
            heard = decode_audio(b"".join(playing.data))
            playing.echo = (self._gain * fftconvolve(heard, self._h)[: len(heard)]).astype(np.float32)
        return playing.echo

    def _mix(self, t0: float) -> np.ndarray:
        """The mic's next 20 ms, its first sample heard at ``t0``."""
        out = self._noise * self._rng.standard_normal(CHUNK).astype(np.float32)
        for playing in self._turns.values():
            echo = self._echo(playing)
            start = round((t0 - self._delay - playing.started) * RATE)
            stop_at = len(echo) if playing.stopped is None else round((playing.stopped - playing.started) * RATE)
            lo, hi = max(start, 0), min(start + CHUNK, len(echo), stop_at)
            if hi > lo:
                out[lo - start : hi - start] += echo[lo:hi]
        if self._voice:
            if self.voice_started is None:
                self.voice_started = t0
            v = self._voice[0]
            k = min(CHUNK, len(v))
            out[:k] += v[:k]
            self._voice[0] = v[k:]
            if not len(self._voice[0]):
                self._voice.pop(0)
        return out

    async def _run(self) -> None:
        start = time.perf_counter()
        i = 0
        while True:
            t0 = start + i * CHUNK / RATE
            await self._ws.send(frame(pcm16(np.clip(self._mix(t0), -1, 1)), i))
            i += 1
            delay = start + i * CHUNK / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
