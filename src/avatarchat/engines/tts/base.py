"""The TTS engine interface. Synthesis is blocking CPU work: callers run it in a worker thread.

A voice served by another machine (``RemoteTTSEngine``) is awaited on the event loop instead: it costs
this machine no CPU slot, and cancelling the await aborts the request.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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


@runtime_checkable
class RemoteTTSEngine(Protocol):
    """A TTS service (OpenAI-compatible, Edge). ``synthesize`` is its blocking form, for the render CLI
    and start-up calibration; a turn awaits ``speak``. Both return audio at ``sample_rate``."""

    name: str
    sample_rate: int

    def load(self) -> None: ...

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech: ...

    def voices(self) -> list[str]: ...

    async def speak(self, text: str, *, rate: float = 1.0) -> Speech:
        """Speak ``text``, raising ``TTSError`` with the service's reason; cancellable at any await."""
        ...

    async def close(self) -> None: ...
