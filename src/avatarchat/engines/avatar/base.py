"""What a renderer is to the pipeline, and the speech audio that renderers driven by audio are given.

Every renderer turns (frame index, mouth row) into an RGB frame (``AvatarRendererProtocol``); the
idle loop, posters and the pipeline's frames all come from ``render``. A renderer that needs the
speech itself (Wav2Lip: mel windows around each frame) also says ``wants_audio = True`` and implements
``render_speech``. The pipeline then keeps a ``SpeechTrack`` per stream: the audio the stream's
encoder got, which is the whole turn's speech, sample-aligned to its frames (pipeline/media.py's
Timeline keeps audio and video the same length). Nothing else in the pipeline changes: the mouth rows,
batches, the remote render API and the encoder are the same for both kinds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.signal import firwin, resample_poly


@runtime_checkable
class AvatarRendererProtocol(Protocol):
    fps: int
    idle_period_frames: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        ...

    def render(self, frame_index: int, mouth: np.ndarray | Sequence[float], out: np.ndarray | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB for avatar frame ``frame_index`` (idle motion) with mouth row ``mouth``."""
        ...

    def idle_frames(self) -> Iterator[np.ndarray]:
        """One seamless period of the idle loop."""
        ...


@runtime_checkable
class SpeechRendererProtocol(AvatarRendererProtocol, Protocol):
    """A renderer driven by the speech audio (mouth rows are given too, and may be ignored)."""

    wants_audio: bool

    def render_speech(self, frames: Sequence[int], mouth: np.ndarray, speech: SpeechTrack) -> list[np.ndarray]:
        """One image per avatar frame index in ``frames`` (ascending), with ``mouth`` rows alongside."""
        ...


def wants_audio(renderer: object) -> bool:
    return bool(getattr(renderer, "wants_audio", False))


@lru_cache(maxsize=8)
def _fir(up: int, down: int) -> np.ndarray:
    """resample_poly's own low-pass filter for up/down, designed once (designing it cost more than filtering)."""
    return firwin(2 * 10 * max(up, down) + 1, 1.0 / max(up, down), window=("kaiser", 5.0)).astype(np.float32)


class SpeechTrack:
    """One stream's speech, as its encoder got it, aligned to the stream's frames.

    Sample 0 is where the stream's first frame starts (``origin``, the avatar frame index of that frame,
    set by the first render). Audio not pushed yet (the next piece, past the encoder's lead) reads as
    silence. Audio long past is dropped (``forget_before``), so a long turn holds a few seconds only.
    """

    KEEP_S = 1.0

    def __init__(self, rate: int, fps: int) -> None:
        self.rate = rate
        self.fps = fps
        self.origin: int | None = None
        self._buf = np.zeros(0, np.float32)
        self._start = 0  # the stream sample index of _buf[0]

    @property
    def pushed(self) -> int:
        """Samples pushed so far."""
        return self._start + len(self._buf)

    def push(self, audio: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, np.asarray(audio, np.float32).reshape(-1)])

    def begin(self, first_frame: int) -> None:
        if self.origin is None:
            self.origin = first_frame

    def frame(self, frame_index: int) -> int:
        """The stream's own count of ``frame_index`` (0 = its first frame)."""
        return frame_index - (self.origin if self.origin is not None else frame_index)

    def samples(self, n0: int, n1: int) -> np.ndarray:
        """Samples [n0, n1) at the stream's rate; zeros outside what is held."""
        out = np.zeros(max(0, n1 - n0), np.float32)
        a, b = max(n0, self._start), min(n1, self.pushed)
        if b > a:
            out[a - n0 : b - n0] = self._buf[a - self._start : b - self._start]
        return out

    def resampled(self, n0: int, n1: int, rate: int) -> np.ndarray:
        """Samples [n0, n1) of the speech at ``rate`` (sample n at n / rate seconds after the stream's start).

        Resampled from a slice with a margin wide enough for the polyphase filter, on the grid of the
        whole signal, so consecutive calls agree with resampling everything at once."""
        if rate == self.rate:
            return self.samples(n0, n1)
        g = math.gcd(rate, self.rate)
        up, down = rate // g, self.rate // g
        margin = 64 + 20 * max(up, down) // down  # output samples: twice the polyphase filter's half-length
        q0 = math.floor((n0 - margin) / up)
        q1 = math.ceil((n1 + margin) / up)
        y = resample_poly(self.samples(q0 * down, q1 * down), up, down, window=_fir(up, down)).astype(np.float32)
        return y[n0 - q0 * up : n1 - q0 * up]

    def forget_before(self, frame_index: int) -> None:
        """Drop what lies more than KEEP_S before avatar frame ``frame_index``."""
        if self.origin is None:
            return
        keep_from = round((frame_index - self.origin) * self.rate / self.fps - self.KEEP_S * self.rate)
        drop = min(len(self._buf), keep_from - self._start)
        if drop > self.rate:  # in chunks, not every batch
            self._buf = self._buf[drop:].copy()
            self._start += drop
