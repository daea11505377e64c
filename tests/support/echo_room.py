"""Speakers next to the microphone: the avatar's replies come back into the mic, delayed, reverberant, quieter.

A ``SpeakerMic`` is a player and a microphone on one clock (the microphone's sample count, as in a browser):
it plays each turn's audio from its first fragment's arrival, stalling when the media runs dry as a player does,
and feeds the session's microphone in real time with what the speaker played as a room returns it, plus
whatever the person says. Its playback reports carry the microphone sample they were read at, so a client that
falls behind (a busy test process) shifts neither against the other. Chromium's fake microphone plays a fixed
file and cannot hear the page's own output; this puts the reply itself into the microphone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import fftconvolve

from avatarchat.engines.tts.audio import decode_audio as engine_decode
from tests.support.speech import RATE, frame, pcm16

CHUNK = RATE // 50  # 20 ms frames


def decode_audio(fmp4: bytes) -> np.ndarray:
    """The audio track of an fMP4 stream (init segment and whole fragments), mono, 16 kHz."""
    return engine_decode(fmp4, RATE) if fmp4 else np.zeros(0, np.float32)


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
    data: list[bytes] = field(default_factory=list)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # decoded so far, 16 kHz
    decoded_parts: int = 0
    played: int = 0  # samples played: the playback position
    stalled: bool = False  # waiting for media, as a player does when it runs dry
    stopped: bool = False


class SpeakerMic:
    """Feeds ``ws`` with 20 ms mic frames in real time: the room's echo of what plays, plus the person."""

    def __init__(self, ws, delay_ms: float = 100, gain_db: float = -6, rt60_s: float = 0.3,  # type: ignore[no-untyped-def]
                 noise_db: float = -60, seed: int = 0) -> None:
        self._ws = ws
        self._delay = round(delay_ms * RATE / 1000)
        self._gain = 10 ** (gain_db / 20)
        self._h = room_response(rt60_s, seed)
        self._noise = 10 ** (noise_db / 20)
        self._rng = np.random.default_rng(seed)
        self._turns: dict[int, _Playing] = {}
        self._current: _Playing | None = None
        # What the speaker played, the last samples the room still returns (mic clock).
        self._out = np.zeros(len(self._h) + self._delay + CHUNK, np.float32)
        self._voice: list[np.ndarray] = []
        self._task: asyncio.Task[None] | None = None
        self.voice_started: float | None = None  # perf_counter() when the last ``say`` began to play
        self.samples = 0  # sent so far: playback reports say at which mic sample they were read

    def media(self, turn_id: int, data: bytes) -> None:
        """A media fragment arrived. A new turn plays from its first fragment's arrival, and replaces the last."""
        playing = self._turns.get(turn_id)
        if playing is None:
            playing = self._turns[turn_id] = _Playing()
            self._current = playing
        playing.data.append(data)

    def position_ms(self, turn_id: int) -> float:
        """Where playback of ``turn_id`` is now (what the client reports)."""
        playing = self._turns.get(turn_id)
        return 0.0 if playing is None else playing.played * 1000 / RATE

    def playing(self, turn_id: int) -> bool:
        playing = self._turns.get(turn_id)
        return playing is not None and not playing.stalled and not playing.stopped

    def stop(self, turn_id: int) -> None:
        """The client stopped playing ``turn_id`` (an interrupt)."""
        if turn_id in self._turns:
            self._turns[turn_id].stopped = True

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

    def _play(self) -> np.ndarray:
        """The speaker's next 20 ms: the current turn from where it is, as far as its media has arrived."""
        out = np.zeros(CHUNK, np.float32)
        p = self._current
        if p is None or p.stopped:
            return out
        if p.decoded_parts != len(p.data):
            p.decoded_parts = len(p.data)
            p.audio = decode_audio(b"".join(p.data))
        got = p.audio[p.played : p.played + CHUNK]
        out[: len(got)] = got
        p.played += len(got)
        p.stalled = len(got) < CHUNK
        return out

    def _mix(self) -> np.ndarray:
        """The mic's next 20 ms: the room's return of the speaker (delayed, reverberant, quieter), noise, the person."""
        self._out = np.concatenate([self._out[CHUNK:], self._play()])
        # mic[k] = gain * sum_j h[j] * out[k - delay - j]: the window of the speaker's output this chunk needs.
        lo = len(self._out) - self._delay - CHUNK - len(self._h) + 1
        echo = fftconvolve(self._out[lo : lo + len(self._h) + CHUNK - 1], self._h, mode="valid")
        out = self._gain * echo.astype(np.float32) + self._noise * self._rng.standard_normal(CHUNK).astype(np.float32)
        if self._voice:
            if self.voice_started is None:
                self.voice_started = time.perf_counter()  # sent right after this
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
            await self._ws.send(frame(pcm16(np.clip(self._mix(), -1, 1)), i))
            i += 1
            self.samples += CHUNK
            delay = start + i * CHUNK / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
