"""The speech-recognition interface. Transcription is blocking CPU work: callers run it off the loop."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ASRError(RuntimeError):
    """Transcription failed; the message says why."""


class ASREngine(Protocol):
    name: str
    sample_rate: int

    def load(self) -> None: ...

    def transcribe(self, audio: np.ndarray) -> str:
        """Transcribe 16 kHz mono float32 audio. Not thread-safe: callers serialize (see ``ASRQueue``)."""
        ...
