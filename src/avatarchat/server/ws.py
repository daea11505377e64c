"""The session WebSocket (protocol in docs/protocol.md)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import socket
import struct
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from avatarchat import metrics
from avatarchat.engines.avatar.library import NAME_RULE, UnknownAvatarError, valid_name
from avatarchat.engines.llm.base import LLMEngine, LLMError, Routable
from avatarchat.engines.registry import Engines
from avatarchat.engines.video.fmp4 import mime_for
from avatarchat.pipeline.avatar_media import MediaError
from avatarchat.pipeline.session import Session, SessionLimitError, SessionManager
from avatarchat.server.access import origin_allowed

PROTOCOL = 1
MEDIA_FMP4 = 1  # server → client: a piece of a turn's fMP4 stream
MIC_PCM16 = 2  # client → server: 16 kHz mono signed 16-bit little-endian PCM
_HEADER = struct.Struct(">2sBBI")

log = logging.getLogger(__name__)
router = APIRouter()
_background: set[asyncio.Task[None]] = set()  # keep expiry tasks referenced until they finish


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WebSocketSender:
    """The one writer of a socket. The turn's stages and the receive loop queue their messages and never wait
    on the client; a writer task sends them in order. A client that stops reading cannot hold its session (and
    its slot) for ever: the queue is bounded (``server.max_send_buffer_bytes``) and each send has a deadline
    (``server.send_timeout_s``). Past either, the client is told why if its socket still takes it, and
    ``ended`` is set: the endpoint then closes the session (as it does after ``close``, which also sets it)."""

    def __init__(self, ws: WebSocket, max_buffer_bytes: int = 4 * 2**20, send_timeout_s: float = 10.0) -> None:
        self._ws = ws
        self._max = max_buffer_bytes
        self._timeout = send_timeout_s
        self._queue: collections.deque[str | bytes] = collections.deque()
        self._buffered = 0
        self._ready = asyncio.Event()  # something is queued
        self._drained = asyncio.Event()  # nothing is queued or being sent
        self._drained.set()
        self.ended = asyncio.Event()
        self.reason = ""
        self._why: str | None = None  # the error event that tells a dropped client why
        self._writer = asyncio.create_task(self._write(), name="ws-writer")
        _cap_kernel_buffer(ws, min(max_buffer_bytes, 256 * 1024))

    async def event(self, type: str, **fields: object) -> None:
        if type == "error":
            metrics.ERRORS.labels(str(fields.get("code"))).inc()
        text = json.dumps({"type": type, **fields}, ensure_ascii=False, separators=(",", ":"))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (from an LLM, say): as an escape it is still valid JSON
            text = json.dumps({"type": type, **fields}, separators=(",", ":"))
        self._put(text)

    async def media(self, turn_id: int, payload: bytes) -> None:
        self._put(_HEADER.pack(b"AC", PROTOCOL, MEDIA_FMP4, turn_id) + payload)

    def _put(self, message: str | bytes) -> None:
        if self.reason or self._writer.done():  # disconnecting, or the client is gone
            return
        if self._buffered + len(message) > self._max:
            self._fail("slow_client", f"the client fell {self._buffered + len(message)} bytes behind the stream "
                                      f"(limit {self._max})")
            return
        self._buffered += len(message)
        self._queue.append(message)
        self._drained.clear()
        self._ready.set()

    def _fail(self, code: str, message: str) -> None:
        """Drop what waits; the next thing written, if the socket takes it, is why."""
        log.warning("disconnecting a client", extra={"code": code, "reason": message})
        metrics.ERRORS.labels(code).inc()
        self.reason = message
        self._queue.clear()
        self._buffered = 0
        self._why = json.dumps({"type": "error", "code": code, "message": message, "fatal": True}, separators=(",", ":"))
        self._queue.append(self._why)
        self._drained.clear()
        self._ready.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._ready.wait()
                if not self._queue:
                    self._ready.clear()
                    self._drained.set()
                    if self.reason:
                        return
                    continue
                message = self._queue.popleft()
                if not self.reason:
                    self._buffered -= len(message)
                if self._ws.application_state != WebSocketState.CONNECTED:
                    continue
                try:
                    # The reason for a disconnect gets a short try: the socket may be the very problem.
                    async with asyncio.timeout(1.0 if self.reason else self._timeout):
                        if isinstance(message, bytes):
                            await self._ws.send_bytes(message)
                        else:
                            await self._ws.send_text(message)
                except TimeoutError:
                    if message is self._why:
                        return  # not even that went out: the close will do
                    if not self.reason:
                        self._fail("slow_client", f"the client did not take a message within {self._timeout:g} s")
                except (RuntimeError, WebSocketDisconnect, OSError):
                    return  # the client is gone: the receive loop sees it too
        finally:
            self._drained.set()
            if self.reason:
                self.ended.set()

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (a bounded time) until what is queued has been written."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    async def close(self, code: int = 1000) -> None:
        """Send what is queued (a fatal error, say), then close the socket; never waits long on the client."""
        await self.flush()
        self._writer.cancel()
        self.ended.set()  # even if the client never answers the close, its session ends
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                await self._ws.close(code)


def _cap_kernel_buffer(ws: WebSocket, size: int) -> None:
    """Best effort: the kernel's send buffer on loopback grows to megabytes, which would hide a stalled client
    behind half a minute of stream. Capped, a client that stops reading shows up within the configured budget.
    (The ASGI scope has no socket; uvicorn's protocol behind ``receive`` has the transport.)"""
    transport = getattr(getattr(ws._receive, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _finite(token: str) -> float:
    """NaN, Infinity and 1e400 are not JSON (RFC 8259): echoed in a ``pong``, a browser's JSON.parse would throw."""
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token[:24]} is not a finite number")
    return value


def parse_event(text: str, max_chars: int) -> dict[str, Any]:
    try:
        event = json.loads(text, parse_float=_finite, parse_constant=_finite)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"not valid JSON: {e.msg} at position {e.pos}") from e
    except ValueError as e:  # e.g. an integer literal past Python's 4,300-digit conversion limit
        raise ProtocolError("bad_json", f"not valid JSON: {str(e)[:120]}") from e
    except RecursionError as e:  # nesting past Python's recursion limit ("[[[[…", found by tests/test_fuzz_ws.py)
        raise ProtocolError("bad_json", "not valid JSON here: nested too deeply") from e
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError("bad_event", 'an event must be a JSON object with a string "type"')
    try:  # "\ud800" is valid JSON but not text: it could be neither spoken nor sent back
        json.dumps(event, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProtocolError("bad_unicode", "strings must be valid Unicode (found a lone surrogate)") from e
    kind = event["type"]
    if kind == "user_text":
        value = event.get("text")
        if not isinstance(value, str) or not value.strip():
            raise ProtocolError("invalid_field", "user_text needs a non-empty string field 'text'")
        if len(value) > max_chars:
            raise ProtocolError("invalid_field", f"text is {len(value)} characters; the limit is {max_chars}")
    elif kind == "mic_start":
        if event.get("sample_rate", 16000) != 16000 or event.get("format", "pcm_s16le") != "pcm_s16le":
            raise ProtocolError("invalid_field", "mic audio must be 16000 Hz mono pcm_s16le")
    elif kind == "playback":
        position = event.get("position_ms")
        # Bounded: an integer past float range (10**400) made float() raise (found by tests/test_fuzz_ws.py).
        if not isinstance(event.get("turn_id"), int) or not isinstance(position, int | float) or abs(position) > 2**53:
            raise ProtocolError("invalid_field", "playback needs an integer 'turn_id' and a number 'position_ms'")
        if not isinstance(event.get("playing", True), bool):
            raise ProtocolError("invalid_field", "playback 'playing' must be a boolean")
        mic = event.get("mic_samples")
        if mic is not None and (not isinstance(mic, int) or isinstance(mic, bool) or not 0 <= mic <= 2**53):
            raise ProtocolError("invalid_field", "playback 'mic_samples' must be a non-negative integer")
    elif kind == "session.update":
        _check_update(event)
    elif kind == "hello":
        if event.get("protocol") != PROTOCOL:
            raise ProtocolError("unsupported_protocol", f"this server speaks protocol {PROTOCOL}")
    elif kind not in ("stop", "ping", "mic_stop"):
        raise ProtocolError("unknown_type", f"unknown event type {kind[:40]!r}")
    return event


_UPDATE_FIELDS = ("rate", "silence_ms", "voice", "language", "llm", "avatar")


def _check_update(event: dict[str, Any]) -> None:
    """Types and ranges of a ``session.update``; choices that depend on the server are checked in ``configure``."""
    if not any(k in event for k in _UPDATE_FIELDS):
        raise ProtocolError("invalid_field", f"session.update needs at least one of {', '.join(_UPDATE_FIELDS)}")
    rate = event.get("rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.5 <= rate <= 2.0:
        raise ProtocolError("invalid_field", "rate must be a number from 0.5 to 2.0")
    silence = event.get("silence_ms", 500)
    if isinstance(silence, bool) or not isinstance(silence, int) or not 200 <= silence <= 3000:
        raise ProtocolError("invalid_field", "silence_ms must be an integer from 200 to 3000")
    for key in ("voice", "language", "avatar"):
        if key in event and (not isinstance(event[key], str) or not 0 < len(event[key]) <= 64):
            raise ProtocolError("invalid_field", f"{key} must be a string of 1 to 64 characters")
    if "avatar" in event and not valid_name(event["avatar"]):
        raise ProtocolError("invalid_field", NAME_RULE)
    llm = event.get("llm", {})
    if not isinstance(llm, dict) or any(not isinstance(llm.get(k, ""), str) for k in ("provider", "model")):
        raise ProtocolError("invalid_field", "llm must be an object with string fields 'provider' and 'model'")


def session_settings(session: Session) -> dict[str, Any]:
    """The settings in effect for a session, and the choices this server offers."""
    s, engines = session.settings, session.engines
    return {
        "rate": s.tts.rate,
        "silence_ms": s.voice.silence_ms,
        "voice": engines.tts.voices()[0],
        "language": s.asr.language or "auto",
        "llm": {"provider": s.llm.engine, "model": llm_model(engines, session.llm)},
        "avatar": session.avatar,
        "options": {
            "voices": engines.tts.voices(),
            "languages": [s.asr.language or "auto"],
            "llm": [{"provider": s.llm.engine, "model": m} for m in llm_models(engines)],
            "avatars": session.media.names(),
        },
    }


def llm_model(engines: Engines, llm: object = None) -> str:
    s = engines.settings.llm
    if s.engine == "openai":
        return s.openai.model
    if isinstance(llm or engines.llm, Routable):
        return (llm or engines.llm).model  # type: ignore[union-attr]
    path = getattr(engines.llm, "model_path", None)
    return path.stem if path is not None else "default"


def llm_models(engines: Engines) -> list[str]:
    """The models a session may pick: through the router, every configured one; else the one loaded."""
    if isinstance(engines.llm, Routable):
        return engines.llm.offered_models()
    return [llm_model(engines)]


async def configure(session: Session, event: dict[str, Any]) -> None:
    """Apply a validated ``session.update``: all fields or none."""
    engines = session.engines
    current = session_settings(session)
    voice, language = event.get("voice"), event.get("language")
    if voice is not None and voice not in engines.tts.voices():
        raise ProtocolError("invalid_field", f"no voice named {voice!r}; this server has {engines.tts.voices()}")
    if language is not None and language != current["language"]:
        raise ProtocolError(
            "invalid_field", f"language {language!r} is not available; the speech recognizer is set up for {current['language']!r}"
        )
    llm = event.get("llm")
    routed: LLMEngine | None = None
    if llm is not None:
        offered = current["llm"]
        provider, model = llm.get("provider", offered["provider"]), llm.get("model", offered["model"])
        if isinstance(engines.llm, Routable) and provider == offered["provider"]:
            # Any model, alias or tag query that a channel can serve now (checked, not just listed).
            if len(model) > 200:
                raise ProtocolError("invalid_field", "llm.model is over 200 characters")
            try:
                await engines.llm.check_model(model)
            except LLMError as e:
                raise ProtocolError("invalid_field", str(e)) from e
            routed = engines.llm.with_model(model)
        elif provider != offered["provider"] or model != offered["model"]:
            raise ProtocolError(
                "invalid_field", f"LLM {llm.get('provider')}/{llm.get('model')} is not available; this server runs "
                f"{offered['provider']}/{offered['model']}"
            )
    avatar = event.get("avatar")
    if avatar is not None and avatar != session.avatar:
        try:
            if not await session.media.exists(avatar):
                raise ProtocolError("invalid_field", f"no avatar named {avatar[:64]!r}")
            await session.media.size(avatar)  # load it now (here or on the avatar service): the next turn starts at once
        except UnknownAvatarError as e:
            raise ProtocolError("invalid_field", f"no avatar named {avatar[:64]!r}") from e
        except MediaError as e:
            raise ProtocolError(e.code, str(e)) from e
        session.avatar = avatar
    if routed is not None:
        session.llm = routed
    if "rate" in event:
        session.settings.tts.rate = float(event["rate"])
    if "silence_ms" in event:
        session.settings.voice.silence_ms = int(event["silence_ms"])


def parse_audio(data: bytes, session: Session, max_bytes: int) -> bytes:
    """Validate a binary client frame; returns its PCM payload."""
    if len(data) < _HEADER.size:
        raise ProtocolError("bad_binary", f"a binary frame needs an {_HEADER.size}-byte header")
    magic, version, kind, _seq = _HEADER.unpack_from(data)
    if magic != b"AC" or version != PROTOCOL:
        raise ProtocolError("bad_binary", "binary frames start with b'AC' and the protocol version")
    if kind != MIC_PCM16:
        raise ProtocolError("bad_binary", f"unknown binary frame kind {kind}")
    pcm = data[_HEADER.size :]
    if len(data) > max_bytes:
        raise ProtocolError("audio_too_large", f"audio frame of {len(data)} bytes is over the {max_bytes}-byte limit")
    if len(pcm) % 2:
        raise ProtocolError("bad_audio", f"PCM16 payload has an odd byte count ({len(pcm)})")
    if session.voice is None:
        raise ProtocolError("audio_not_started", "send {\"type\": \"mic_start\"} before audio frames")
    return pcm


@router.websocket("/ws")
async def session_socket(ws: WebSocket) -> None:
    app = ws.app
    allowed = app.state.settings.server.allowed_origins
    origin = ws.headers.get("origin")
    if not origin_allowed(origin, ws.headers.get("host"), allowed):
        # Before the handshake: a page on another site cannot talk to the avatar (cross-site WebSocket).
        await ws.send_denial_response(JSONResponse(
            {"detail": f"origin {(origin or '')[:100]!r} may not open a session (server.allowed_origins)"}, status_code=403))
        return
    await ws.accept()
    engines: Engines = app.state.engines
    manager: SessionManager = app.state.sessions
    settings = engines.settings
    sender = WebSocketSender(ws, settings.server.max_send_buffer_bytes, settings.server.send_timeout_s)
    avatar = ws.query_params.get("avatar") or settings.avatar.default
    if not valid_name(avatar):
        await sender.event("error", code="invalid_field", message=NAME_RULE, fatal=True)
        await sender.close(1008)
        return
    try:
        known = await manager.media.exists(avatar)
    except MediaError as e:
        await sender.event("error", code=e.code, message=str(e), fatal=True)
        await sender.close(1013)
        return
    if not known:
        await sender.event("error", code="invalid_field", message=f"no avatar named {avatar[:64]!r}", fatal=True)
        await sender.close(1008)
        return

    def on_idle(s: Session) -> None:
        task = asyncio.create_task(_expire(ws, sender))
        _background.add(task)
        task.add_done_callback(_background.discard)

    try:
        session = manager.open(engines, sender, avatar, on_idle)
    except SessionLimitError as e:
        code = "server_busy" if e.reason == "capacity" else "session_limit"
        retry = {} if e.retry_after_s is None else {"retry_after_ms": round(e.retry_after_s * 1000)}
        await sender.event("error", code=code, message=str(e), fatal=True, **retry)
        await sender.close(1013)
        return
    try:
        await engines.ready.wait()
        try:
            width, height = await session.media.size(avatar)
        except MediaError as e:
            await sender.event("error", code=e.code, message=str(e), fatal=True)
            await sender.close(1013)
            return
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
            limits={
                "max_message_bytes": settings.server.max_message_bytes,
                "max_text_chars": settings.pipeline.max_text_chars,
                "max_audio_frame_bytes": settings.voice.max_audio_frame_bytes,
            },
            settings=session_settings(session),
        )
        receiving = asyncio.create_task(_receive_loop(ws, session, sender), name=f"receive-{session.id[:8]}")
        failing = asyncio.create_task(sender.ended.wait())
        try:
            await asyncio.wait({receiving, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failing.cancel()
            if not receiving.done():  # the client fell behind or idled out: its session ends, its slot is free
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                await sender.close(1008)
        if receiving.done() and not receiving.cancelled():
            receiving.result()  # its own errors, handled below
    except (WebSocketDisconnect, UnknownAvatarError):
        pass
    finally:
        await manager.close(session)
        await sender.close()


async def _receive_loop(ws: WebSocket, session: Session, sender: WebSocketSender) -> None:
    while True:
        message = await ws.receive()
        t0 = time.perf_counter()
        if message["type"] == "websocket.disconnect":
            return
        session.touch()
        try:
            await _handle(message, session, sender, t0)
        except (WebSocketDisconnect, UnknownAvatarError):
            raise
        except Exception:  # a bug must cost one message, not the person's session
            log.exception("message failed", extra={"session": session.id})
            metrics.ERRORS.labels("internal_error").inc()
            await sender.event("error", code="internal_error", message="the server failed on this message", fatal=False)


async def _handle(message: Message, session: Session, sender: WebSocketSender, t0: float) -> None:
    settings = session.engines.settings
    limit = settings.server.max_message_bytes
    data = message.get("bytes")
    if data is not None:
        try:
            pcm = parse_audio(data, session, settings.voice.max_audio_frame_bytes)
        except ProtocolError as e:
            await sender.event("error", code=e.code, message=str(e), fatal=False)
            return
        assert session.voice is not None
        await session.voice.feed(pcm)
        return
    text = message.get("text") or ""
    # Bytes, not characters: 64 Ki Chinese characters are 192 KiB. (Encoding only when it could be over.)
    if len(text) > limit or (len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit):
        await sender.event(
            "error", code="message_too_large", message=f"message is over the {limit}-byte limit", fatal=False
        )
        return
    try:
        event = parse_event(text, settings.pipeline.max_text_chars)
    except ProtocolError as e:
        await sender.event("error", code=e.code, message=str(e), fatal=False)
        return
    kind = event["type"]
    if kind == "user_text":
        await session.user_text(event["text"].strip(), t0=t0)
    elif kind == "stop":
        await session.cancel_turn("stopped")
    elif kind == "ping":
        await sender.event("pong", id=event.get("id"))
    elif kind == "mic_start":
        session.start_voice()
        await sender.event("mic_ready", sample_rate=16000, format="pcm_s16le")
    elif kind == "mic_stop":
        if session.voice is not None:
            await session.voice.close()
            session.voice = None
    elif kind == "session.update":
        try:
            await configure(session, event)
        except ProtocolError as e:
            await sender.event("error", code=e.code, message=str(e), fatal=False)
            return
        await sender.event("session.updated", settings=session_settings(session))
    elif kind == "playback":
        session.playback(event["turn_id"], float(event["position_ms"]), bool(event.get("playing", True)),
                         event.get("mic_samples"))


async def _expire(ws: WebSocket, sender: WebSocketSender) -> None:
    await sender.event("error", code="idle_timeout", message="session closed after being idle", fatal=True)
    await sender.close(1000)
