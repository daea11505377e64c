"""The TTS engine interface. Synthesis is blocking CPU work: callers run it in a worker thread."""

from __future__ import annotations

from typing import Protocol

from avatarchat.engines.types import Speech


class TTSError(RuntimeError):
    """Synthesis failed; the message says why."""


class TTSEngine(Protocol):
    name: str

    def load(self) -> None:
        """Load the voice. Called once, in a worker thread."""

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        """Speak ``text``; ``rate`` > 1 speaks faster. Safe to call from several threads."""
        ...

    def voices(self) -> list[str]: ...
