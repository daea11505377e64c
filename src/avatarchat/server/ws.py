"""The session WebSocket (protocol in docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from avatarchat import metrics
from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.engines.registry import Engines
from avatarchat.engines.video.fmp4 import mime_for
from avatarchat.pipeline.session import Session, SessionLimitError, SessionManager

PROTOCOL = 1
MEDIA_FMP4 = 1
_HEADER = struct.Struct(">2sBBI")

log = logging.getLogger(__name__)
router = APIRouter()
_background: set[asyncio.Task[None]] = set()  # keep expiry tasks referenced until they finish


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WebSocketSender:
    """Serializes sends: stages of a turn and the receive loop share one socket."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._lock = asyncio.Lock()

    async def event(self, type: str, **fields: object) -> None:
        if type == "error":
            metrics.ERRORS.labels(str(fields.get("code"))).inc()
        await self._send({"type": type, **fields})

    async def media(self, turn_id: int, payload: bytes) -> None:
        async with self._lock:
            if self._ws.application_state == WebSocketState.CONNECTED:
                await self._ws.send_bytes(_HEADER.pack(b"AC", MEDIA_FMP4, 0, turn_id) + payload)

    async def _send(self, event: dict[str, Any]) -> None:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        async with self._lock:
            if self._ws.application_state == WebSocketState.CONNECTED:
                await self._ws.send_text(text)


def parse_event(text: str, max_chars: int) -> dict[str, Any]:
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"not valid JSON: {e.msg} at position {e.pos}") from e
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError("bad_event", 'an event must be a JSON object with a string "type"')
    kind = event["type"]
    if kind == "user_text":
        value = event.get("text")
        if not isinstance(value, str) or not value.strip():
            raise ProtocolError("invalid_field", "user_text needs a non-empty string field 'text'")
        if len(value) > max_chars:
            raise ProtocolError("invalid_field", f"text is {len(value)} characters; the limit is {max_chars}")
    elif kind == "hello":
        if event.get("protocol") != PROTOCOL:
            raise ProtocolError("unsupported_protocol", f"this server speaks protocol {PROTOCOL}")
    elif kind not in ("stop", "ping"):
        raise ProtocolError("unknown_type", f"unknown event type {kind[:40]!r}")
    return event


@router.websocket("/ws")
async def session_socket(ws: WebSocket) -> None:
    await ws.accept()
    app = ws.app
    engines: Engines = app.state.engines
    manager: SessionManager = app.state.sessions
    settings = engines.settings
    sender = WebSocketSender(ws)
    avatar = ws.query_params.get("avatar") or settings.avatar.default
    if avatar not in engines.avatars.names():
        await sender.event("error", code="invalid_field", message=f"no avatar named {avatar[:64]!r}", fatal=True)
        await ws.close(1008)
        return

    def on_idle(s: Session) -> None:
        task = asyncio.create_task(_expire(ws, sender))
        _background.add(task)
        task.add_done_callback(_background.discard)

    try:
        session = manager.open(engines, sender, avatar, on_idle)
    except SessionLimitError as e:
        await sender.event("error", code="session_limit", message=str(e), fatal=True)
        await ws.close(1013)
        return
    try:
        await engines.ready.wait()
        renderer = await asyncio.get_running_loop().run_in_executor(engines.workers, engines.avatars.renderer, avatar)
        width, height = renderer.size
        await sender.event(
            "session",
            protocol=PROTOCOL,
            session_id=session.id,
            avatar=avatar,
            media={
                "mime": mime_for(None),
                "width": width,
                "height": height,
                "fps": settings.avatar.fps,
            },
            limits={"max_message_bytes": settings.server.max_message_bytes, "max_text_chars": settings.pipeline.max_text_chars},
        )
        await _receive_loop(ws, session, sender)
    except (WebSocketDisconnect, UnknownAvatarError):
        pass
    finally:
        await manager.close(session)


async def _receive_loop(ws: WebSocket, session: Session, sender: WebSocketSender) -> None:
    settings = session.engines.settings
    limit = settings.server.max_message_bytes
    while True:
        message = await ws.receive()
        t0 = time.perf_counter()
        if message["type"] == "websocket.disconnect":
            return
        session.touch()
        if message.get("bytes") is not None:
            await sender.event(
                "error", code="unsupported_binary", message="binary frames from the client are not accepted yet", fatal=False
            )
            continue
        text = message.get("text") or ""
        if len(text) > limit and len(text.encode("utf-8")) > limit:
            await sender.event(
                "error", code="message_too_large", message=f"message is over the {limit}-byte limit", fatal=False
            )
            continue
        try:
            event = parse_event(text, settings.pipeline.max_text_chars)
        except ProtocolError as e:
            await sender.event("error", code=e.code, message=str(e), fatal=False)
            continue
        kind = event["type"]
        if kind == "user_text":
            await session.user_text(event["text"].strip(), t0=t0)
        elif kind == "stop":
            await session.cancel_turn("stopped")
        elif kind == "ping":
            await sender.event("pong", id=event.get("id"))


async def _expire(ws: WebSocket, sender: WebSocketSender) -> None:
    try:
        await sender.event("error", code="idle_timeout", message="session closed after being idle", fatal=True)
        await ws.close(1000)
    except (RuntimeError, WebSocketDisconnect):
        pass  # already gone
