"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

DONE = b"[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_frame(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    return frame(json.dumps(error_body(message, type_, code), separators=(",", ":")).encode())


async def events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data`` payload of each event (multi-line data joined by \\n); comments and other fields dropped."""
    async for batch in batches(chunks):
        for payload in batch:
            yield payload


async def batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Like ``events``, but the payloads completed by each read come together: a relay that is behind
    forwards them in one write instead of one per event."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                continue  # a \r\n may be split across chunks
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out = []
        while True:
            cut = buf.find(b"\n\n")
            if cut < 0:
                break
            block, buf = buf[:cut], buf[cut + 2 :]
            payload = _data(block)
            if payload is not None:
                out.append(payload)
        if out:
            yield out
    if buf.strip():
        payload = _data(buf)
        if payload is not None:
            yield [payload]


def _data(block: bytes) -> bytes | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]  # the common case, without splitting
    parts = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v.startswith(b" ") else v)
    return b"\n".join(parts) if parts else None


def has_output(payload: bytes) -> bool:
    """Does this chunk carry something for the caller (text, tool call, finish)? Role-only chunks don't."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "function_call", "refusal", "reasoning_content")):
            return True
    return False


def error_in(payload: bytes) -> str | None:
    """The message of an in-stream error object, or None."""
    if b'"error"' not in payload:
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    return None
