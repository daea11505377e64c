"""The LLM engine interface: stream the reply to a chat as text deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class LLMError(RuntimeError):
    """The engine could not produce a reply; the message says why, for the user."""


class LLMEngine(Protocol):
    name: str

    async def start(self) -> None:
        """Load and warm up. Called once before the first request."""

    async def close(self) -> None: ...

    def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        """Yield reply text deltas. Closing the iterator cancels generation."""
        ...

    def count_tokens(self, text: str) -> int: ...
