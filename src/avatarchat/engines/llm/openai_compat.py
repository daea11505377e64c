"""Any OpenAI-compatible chat-completions server (OpenAI, DeepSeek, vLLM, Ollama, the LLM router…)."""

from __future__ import annotations

import asyncio
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
        try:
            async with self._client.stream("POST", "chat/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:500].decode("utf-8", "replace")
                    raise LLMError(f"LLM server answered {response.status_code}: {detail}")
                lines = response.aiter_lines()
                first = True
                while True:
                    try:
                        if first:
                            async with asyncio.timeout(self._config.first_token_timeout_s):
                                line = await anext(lines)
                        else:
                            line = await anext(lines)
                    except StopAsyncIteration:
                        return
                    except TimeoutError as e:
                        raise LLMError(
                            f"LLM server sent nothing within {self._config.first_token_timeout_s:g} s"
                        ) from e
                    first = False
                    delta = _parse_sse_line(line)
                    if delta is _END:
                        return
                    if delta:
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
    except json.JSONDecodeError as e:
        raise LLMError(f"LLM server sent invalid JSON in its stream: {data[:200]!r}") from e
    if "error" in payload:
        err = payload["error"]
        raise LLMError(f"LLM server error: {err.get('message', err) if isinstance(err, dict) else err}")
    choices = payload.get("choices") or []
    if not choices:
        return None
    return (choices[0].get("delta") or {}).get("content") or None
