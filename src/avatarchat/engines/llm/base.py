"""The LLM engine interface: stream the reply to a chat as text deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

# The conversation (session id) that the running code serves: a local engine keeps each conversation's
# state apart by it (engines/llm/llama_cpp.py). Set by the session in its turn and prefill tasks.
conversation: ContextVar[str | None] = ContextVar("conversation", default=None)


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


@runtime_checkable
class Prefills(Protocol):
    """A local engine that can evaluate a conversation's history ahead of the next message."""

    async def prefill(self, messages: list[dict[str, str]]) -> None: ...


@runtime_checkable
class Routable(Protocol):
    """An engine over several models (the LLM router): each session may pick its own."""

    @property
    def model(self) -> str: ...

    def with_model(self, model: str) -> LLMEngine:
        """A view of the engine asking for ``model``; it shares everything else."""
        ...

    def offered_models(self) -> list[str]: ...

    async def check_model(self, model: str) -> None:
        """Raise LLMError saying why, if ``model`` can't be served now."""
