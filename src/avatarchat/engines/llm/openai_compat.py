"""Any OpenAI-compatible chat-completions server (OpenAI, DeepSeek, vLLM, Ollama, the LLM router…)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx

from avatarchat.config import OpenAIConfig
from avatarchat.engines.llm.base import LLMError
from avatarchat.pipeline.history import approx_tokens


class OpenAIEngine:
    name = "openai"

    def __init__(self, config: OpenAIConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        # Requests beyond max_concurrent wait for a pooled connection (up to the first-token timeout).
        timeout = httpx.Timeout(
            connect=config.connect_timeout_s, read=config.read_timeout_s, write=10.0, pool=config.first_token_timeout_s
        )
        headers = {"Accept": "text/event-stream"}
        if key := config.resolved_key():
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            timeout=timeout,
            headers=headers,
            # Expire idle connections before the server does (see services/llm_exec.py).
            limits=httpx.Limits(max_connections=config.max_concurrent,
                                max_keepalive_connections=min(16, config.max_concurrent), keepalive_expiry=2.0),
            transport=transport,
        )

    async def start(self) -> None:
        return None  # remote: nothing to load; reachability is checked by `doctor` and /ready

    async def close(self) -> None:
        await self._client.aclose()

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        body = {
            "model": self._config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        c = self._config
        loop = asyncio.get_running_loop()
        # Both deadlines count from the request: a server that accepts and then sends only keep-alive
        # comments (or trickles forever) cannot hold the turn.
        first_due = loop.time() + c.first_token_timeout_s
        end_due = loop.time() + c.reply_timeout_s
        got_content = False

        def expired() -> LLMError:
            if got_content:
                return LLMError(f"LLM reply did not end within {c.reply_timeout_s:g} s")
            return LLMError(f"LLM server sent no content within {c.first_token_timeout_s:g} s")

        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout_at(min(first_due, end_due)):
                        response = await stack.enter_async_context(self._client.stream("POST", "chat/completions", json=body))
                        if response.status_code != 200:
                            detail = (await response.aread())[:500].decode("utf-8", "replace")
                            raise LLMError(f"LLM server answered {response.status_code}: {detail}")
                except TimeoutError as e:
                    raise expired() from e
                lines = response.aiter_lines()
                while True:
                    # Only the wait for the server is timed, never the consumer's time between tokens.
                    try:
                        async with asyncio.timeout_at(end_due if got_content else min(first_due, end_due)):
                            line = await anext(lines)
                    except StopAsyncIteration:
                        return
                    except TimeoutError as e:
                        raise expired() from e
                    delta = _parse_sse_line(line)
                    if delta is _END:
                        return
                    if delta:
                        got_content = True
                        yield delta
        except httpx.HTTPError as e:
            raise LLMError(f"LLM server unreachable or failed: {type(e).__name__}: {e}") from e


_END = "\x00END"


def _parse_sse_line(line: str) -> str | None:
    if not line.startswith("data:"):
        return None  # comments, event names, blank separators
    data = line[5:].strip()
    if data == "[DONE]":
        return _END
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, ValueError) as e:  # ValueError: e.g. an integer literal too long to convert
        raise LLMError(f"LLM server sent invalid JSON in its stream: {data[:200]!r}") from e
    if not isinstance(payload, dict):
        raise _shape(data)
    if "error" in payload:
        err = payload["error"]
        raise LLMError(f"LLM server error: {err.get('message', err) if isinstance(err, dict) else err}")
    choices = payload.get("choices")
    if choices is None or choices == []:
        return None  # e.g. a usage-only chunk
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise _shape(data)
    delta = choices[0].get("delta")
    if delta is None:
        return None
    if not isinstance(delta, dict):
        raise _shape(data)
    content = delta.get("content")
    if content is None or content == "":
        return None
    if not isinstance(content, str):
        raise _shape(data)
    return content


def _shape(data: str) -> LLMError:
    return LLMError(f"LLM server sent a chunk that is not a chat-completion delta: {data[:200]!r}")
