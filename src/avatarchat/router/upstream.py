"""Talking to a channel: one pooled ``httpx.AsyncClient`` for every HTTP provider, and an adapter that
serves the in-process LLM engine (the embedded llama.cpp model) as a ``local`` channel.

No retries here: the executor is the only retry layer.
"""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from avatarchat.net.http_transport import HttpTransport
from avatarchat.router import sse
from avatarchat.router.config import RetryConfig

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
CLIENT_STATUS = frozenset({400, 413, 422})  # the request itself is wrong: another channel won't help
_PROBE_DETAIL_BYTES = 4096  # of a failed health probe's body, for its error message


class UpstreamError(Exception):
    def __init__(self, message: str, *, kind: str = "status", status: int | None = None,
                 retry_after: float | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.message, self.kind, self.status, self.retry_after, self.body = message, kind, status, retry_after, body

    @property
    def auth(self) -> bool:
        return self.status in (401, 403)

    @property
    def client_error(self) -> bool:
        return self.status in CLIENT_STATUS

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status in RETRYABLE_STATUS or self.status >= 500
        return True  # connect errors, timeouts, drops, bad frames


@dataclass(frozen=True, slots=True)
class Target:
    channel: str
    model: str
    url: str  # …/chat/completions; "" for the in-process engine
    headers: dict[str, str] = field(default_factory=dict)
    local: bool = False


class Upstream(Protocol):
    async def complete(self, target: Target, body: dict[str, Any]) -> bytes: ...

    def stream(self, target: Target, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        """Batches of SSE data payloads (each JSON chunk, then b"[DONE]")."""
        ...


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _detail(body: bytes) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if err:
            return str(err)[:300]
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


def upstream_error(e: httpx.HTTPError) -> UpstreamError:
    """A transport error as the UpstreamError that names it (connect, timeout or dropped)."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamError(f"connect failed: {type(e).__name__}: {e}".rstrip(": "), kind="connect")
    if isinstance(e, httpx.TimeoutException):
        return UpstreamError(f"timed out: {type(e).__name__}", kind="timeout")
    return UpstreamError(f"connection failed: {type(e).__name__}: {e}".rstrip(": "), kind="dropped")


class HttpUpstream:
    def __init__(self, retry: RetryConfig, transport: str = "httptools") -> None:
        self.retry = retry
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512, keepalive_expiry=30)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(retry.request_timeout_s, connect=retry.connect_timeout_s),
            transport=HttpTransport(limits) if transport == "httptools" else None,
            limits=limits,
            headers={"accept-encoding": "identity"},  # SSE is relayed as is: no compressed bodies
            trust_env=False,
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self.client.aclose()

    def _body(self, target: Target, body: dict[str, Any]) -> bytes:
        return json.dumps({**body, "model": target.model}, separators=(",", ":"), ensure_ascii=False).encode()

    async def complete(self, target: Target, body: dict[str, Any]) -> bytes:
        try:
            resp = await self.client.post(target.url, content=self._body(target, body), headers=target.headers)
        except httpx.HTTPError as e:
            raise upstream_error(e) from None
        if resp.status_code != 200:
            raise UpstreamError(f"HTTP {resp.status_code}: {_detail(resp.content)}", status=resp.status_code,
                                retry_after=retry_after(resp.headers.get("retry-after")), body=resp.content)
        try:
            obj = json.loads(resp.content)
        except ValueError:
            raise UpstreamError("answered 200 with a body that is not JSON", kind="protocol") from None
        if not isinstance(obj, dict) or "choices" not in obj:
            raise UpstreamError(f"answered 200 without choices: {_detail(resp.content)}", kind="protocol")
        return resp.content

    async def stream(self, target: Target, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        r = self.retry
        req = self.client.build_request(
            "POST", target.url, content=self._body(target, body),
            headers={**target.headers, "accept": "text/event-stream"},
            timeout=httpx.Timeout(connect=r.connect_timeout_s, read=r.stall_timeout_s, write=10.0, pool=r.connect_timeout_s),
        )
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise upstream_error(e) from None
        try:
            if resp.status_code != 200:
                data = await resp.aread()
                raise UpstreamError(f"HTTP {resp.status_code}: {_detail(data)}", status=resp.status_code,
                                    retry_after=retry_after(resp.headers.get("retry-after")), body=data)
            async for batch in sse.batches(resp.aiter_raw()):
                yield batch
        except httpx.HTTPError as e:
            raise upstream_error(e) from None
        finally:
            await resp.aclose()

    async def probe(self, base_url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
        """GET …/models: (status, detail); status 0 when unreachable. Only the head is read on a 200 (the
        list can be MBs, every interval, per channel): closing it unread drops that one connection."""
        req = self.client.build_request("GET", base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
        try:
            resp = await self.client.send(req, stream=True)
            try:
                if resp.status_code == 200:
                    return 200, ""
                head = b""
                async for chunk in resp.aiter_raw():
                    head += chunk
                    if len(head) >= _PROBE_DETAIL_BYTES:
                        break
            finally:
                await resp.aclose()
        except httpx.HTTPError as e:
            return 0, upstream_error(e).message
        return resp.status_code, _detail(head[:_PROBE_DETAIL_BYTES])


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


class LocalUpstream:
    """The in-process engine (``LLMEngine``) as an OpenAI-compatible channel."""

    def __init__(self, engine: Any, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.default_max_tokens = default_max_tokens

    def _args(self, body: dict[str, Any]) -> tuple[list[dict[str, str]], int, float]:
        msgs = [{"role": str(m.get("role", "user")), "content": _text(m.get("content"))} for m in body.get("messages", [])]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        temperature = body.get("temperature")
        return msgs, int(max_tokens), 0.7 if temperature is None else float(temperature)

    async def _deltas(self, body: dict[str, Any]) -> AsyncIterator[str]:
        msgs, max_tokens, temperature = self._args(body)
        try:
            async for d in self.engine.stream(msgs, max_tokens=max_tokens, temperature=temperature):
                yield d
        except Exception as e:
            raise UpstreamError(f"local engine failed: {e}", kind="dropped") from None

    async def complete(self, target: Target, body: dict[str, Any]) -> bytes:
        text = "".join([d async for d in self._deltas(body)])
        return json.dumps({
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": target.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }).encode()

    async def stream(self, target: Target, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": target.model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]},
                              ensure_ascii=False, separators=(",", ":")).encode()

        yield [chunk({"role": "assistant", "content": ""})]
        async for d in self._deltas(body):
            yield [chunk({"content": d})]
        yield [chunk({}, "stop"), sse.DONE]
