"""The speech-recognition interface. Transcription is blocking CPU work: callers run it off the loop."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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


@runtime_checkable
class RemoteASREngine(Protocol):
    """A transcription service. ``ASRQueue`` awaits ``transcribe_async`` on the loop, several at once,
    holding no CPU slot; cancelling it aborts the request. ``transcribe`` is the blocking form."""

    name: str
    sample_rate: int

    def load(self) -> None: ...

    def transcribe(self, audio: np.ndarray) -> str: ...

    async def transcribe_async(self, audio: np.ndarray) -> str: ...

    async def close(self) -> None: ...
