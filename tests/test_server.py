"""End to end, with the real embedded models: WebSocket sessions, the pipeline, limits, health."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.live_app import LiveApp

HEADER = struct.Struct(">2sBBI")


@dataclass
class Turn:
    events: list[dict[str, Any]] = field(default_factory=list)
    media: bytearray = field(default_factory=bytearray)
    media_frames: int = 0

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.media: dict[int, bytearray] = {}

    async def event(self, timeout: float = 60) -> dict[str, Any]:
        """The next JSON event; media frames on the way are kept per turn."""
        while True:
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(msg, bytes):
                magic, kind, _, turn_id = HEADER.unpack_from(msg)
                assert (magic, kind) == (b"AC", 1)
                self.media.setdefault(turn_id, bytearray()).extend(msg[HEADER.size :])
                continue
            return json.loads(msg)

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, kind: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seen = []
        while True:
            e = await self.event(timeout)
            seen.append(e)
            if e["type"] == kind:
                return e, seen


async def open_client(app: LiveApp, query: str = "") -> Client:
    ws = await connect(app.ws + query, max_size=None)
    c = Client(ws)
    hello = await c.event()
    assert hello["type"] == "session", hello
    return c


def decode_media(data: bytes) -> tuple[int, float, float, str]:
    with av.open(io.BytesIO(data)) as c:
        codec = c.streams.video[0].codec_context.name
        frames = [f for f in c.decode(video=0)]
        video_s = float(frames[-1].pts * frames[-1].time_base) + 1 / 25
    with av.open(io.BytesIO(data)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        rate = c.streams.audio[0].sample_rate
    return len(frames), video_s, samples / rate, codec


def test_health_ready_metrics_and_page(live_app: LiveApp) -> None:
    assert httpx.get(live_app.http + "/health").json()["status"] == "ok"
    ready = httpx.get(live_app.http + "/ready").json()
    assert ready["ready"] is True and ready["llm"] == "llama_cpp"
    metrics = httpx.get(live_app.http + "/metrics").text
    assert "avatarchat_active_sessions" in metrics and "avatarchat_ready 1.0" in metrics
    page = httpx.get(live_app.http + "/basic")
    assert page.status_code == 200 and "<video" in page.text
    assert httpx.get(live_app.http + "/").status_code == 200  # the web app, or the plain page before a build
    clip = httpx.get(live_app.http + "/avatars/default/idle.mp4")
    assert clip.status_code == 200 and clip.content[4:8] == b"ftyp"
    assert httpx.get(live_app.http + "/avatars/nobody/idle.mp4").status_code == 404
    assert httpx.get(live_app.http + "/avatars/..%2F..%2Fetc/idle.mp4").status_code == 404


async def test_text_turn_end_to_end(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    await c.send(type="user_text", text="Hello! Who are you?")
    done, events = await c.until("turn_done", timeout=120)
    await c.ws.close()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "turn_start"
    deltas = "".join(e["delta"] for e in events if e["type"] == "text_delta")
    assert deltas.strip() and done["text"] == deltas
    assert done["reason"] == "complete"
    assert kinds.index("text_delta") < kinds.index("media_start")
    sentences = [e for e in events if e["type"] == "sentence"]
    assert sentences and sentences[0]["start_ms"] == 0
    for a, b in zip(sentences, sentences[1:]):
        assert b["start_ms"] == a["start_ms"] + a["duration_ms"]  # pieces follow without gaps
    media = bytes(c.media[done["turn_id"]])
    assert media[4:8] == b"ftyp"
    frames, video_s, audio_s, codec = decode_media(media)
    assert codec == "h264"
    assert abs(video_s - audio_s) <= 0.040
    assert abs(done["media_ms"] / 1000 - video_s) <= 0.041
    assert {"first_text", "first_audio", "first_video"} <= set(done["timings"])
    start = next(e for e in events if e["type"] == "media_start")
    assert 'avc1.42' in start["mime"] and "mp4a.40.2" in start["mime"]


async def test_protocol_errors_keep_the_session_up(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    limit = live_app.settings.server.max_message_bytes
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_event"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": "user_text"}), "invalid_field"),
        (json.dumps({"type": "user_text", "text": "   "}), "invalid_field"),
        (json.dumps({"type": "user_text", "text": "x" * (live_app.settings.pipeline.max_text_chars + 1)}), "invalid_field"),
        (json.dumps({"type": "hello", "protocol": 99}), "unsupported_protocol"),
        ("x" * (limit + 1), "message_too_large"),
        ("中" * (limit // 3 + 1), "message_too_large"),  # fewer characters than the limit, more bytes
        ('{"type": "user_text", "text": "hi \\ud800"}', "bad_unicode"),  # valid JSON, not text
        ('{"type": "ping", "id": "\\udfff"}', "bad_unicode"),
        ('{"type": "ping", "id": ' + "1" * 5000 + "}", "bad_json"),  # past Python's int conversion limit
    ]
    for raw, code in cases:
        await c.ws.send(raw)
        e = await c.event()
        assert e["type"] == "error" and e["code"] == code and e["fatal"] is False, (raw[:40], e)
    await c.ws.send(b"\x00\x01\x02")
    e = await c.event()
    assert e["code"] == "bad_binary"
    await c.send(type="ping", id=7)
    assert await c.event() == {"type": "pong", "id": 7}
    await c.send(type="stop")  # nothing running: harmless
    await c.send(type="ping", id=8)
    assert (await c.event())["id"] == 8
    await c.ws.close()


async def test_stop_mid_turn_cancels_everything(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    await c.send(type="user_text", text="Tell me a long story about a dragon and a knight.")
    start, _ = await c.until("media_start", timeout=120)
    await c.send(type="stop")
    done, _ = await c.until("turn_done")
    assert done["reason"] == "stopped" and done["turn_id"] == start["turn_id"]
    received = len(c.media[start["turn_id"]])
    # Nothing of the stopped turn arrives afterwards, and the session still works.
    await c.send(type="ping", id=1)
    assert (await c.until("pong"))[0]["id"] == 1
    await asyncio.sleep(0.3)
    await c.send(type="ping", id=2)
    await c.until("pong")
    assert len(c.media[start["turn_id"]]) == received
    await c.send(type="user_text", text="Hi again.")
    done2, _ = await c.until("turn_done", timeout=120)
    assert done2["reason"] == "complete" and done2["turn_id"] == start["turn_id"] + 1
    await c.ws.close()


async def test_new_message_interrupts_the_running_turn(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    await c.send(type="user_text", text="Tell me a long story about the sea.")
    first, _ = await c.until("text_delta", timeout=120)
    await c.send(type="user_text", text="Stop. What is two plus two?")
    done1, _ = await c.until("turn_done")
    assert done1["reason"] == "interrupted" and done1["turn_id"] == first["turn_id"]
    start2, _ = await c.until("turn_start")
    assert start2["user_text"] == "Stop. What is two plus two?"
    done2, _ = await c.until("turn_done", timeout=120)
    assert done2["reason"] == "complete"
    session = _session(live_app, c)
    roles = [m.role for m in session.history.turns]
    assert roles.count("user") == 2
    await c.ws.close()


def _session(app: LiveApp, c: Client) -> Any:
    manager = app.app.state.sessions
    sessions = list(manager._sessions.values())
    assert sessions
    return sessions[-1]


async def test_sessions_free_everything_no_leaked_tasks_or_threads(live_app: LiveApp) -> None:
    async def turn_tasks() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("turn-"))

    baseline_threads = threading.active_count()
    for i in range(3):
        c = await open_client(live_app)
        await c.send(type="user_text", text="Tell me about the moon.")
        await c.until("text_delta", timeout=120)
        if i == 0:
            await c.send(type="stop")
            await c.until("turn_done")
        await c.ws.close()  # i > 0: close mid-turn
    for _ in range(100):
        if len(live_app.app.state.sessions) == 0 and live_app.call(turn_tasks()) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(live_app.app.state.sessions) == 0
    assert live_app.call(turn_tasks()) == 0
    await asyncio.sleep(0.5)  # worker pools are fixed size: no thread per turn or session
    assert threading.active_count() <= baseline_threads


async def test_session_limit(live_app: LiveApp) -> None:
    cfg = live_app.settings.session
    old = cfg.max_sessions
    cfg.max_sessions = 1
    try:
        c = await open_client(live_app)
        async with connect(live_app.ws) as ws2:
            e = json.loads(await ws2.recv())
            assert e["type"] == "error" and e["code"] == "session_limit" and e["fatal"] is True
            with pytest.raises(ConnectionClosed) as closed:
                await ws2.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        await c.ws.close()
    finally:
        cfg.max_sessions = old


async def test_idle_timeout_closes_the_session(live_app: LiveApp) -> None:
    cfg = live_app.settings.session
    old = cfg.idle_timeout_s
    cfg.idle_timeout_s = 0.3
    try:
        c = await open_client(live_app)
        e = await c.event(timeout=5)
        assert e["code"] == "idle_timeout" and e["fatal"] is True
        with pytest.raises(ConnectionClosed):
            await c.event(timeout=5)
    finally:
        cfg.idle_timeout_s = old


async def test_unknown_avatar_is_refused(live_app: LiveApp) -> None:
    async with connect(live_app.ws + "?avatar=../../etc") as ws:
        e = json.loads(await ws.recv())
        assert e["type"] == "error" and e["code"] == "invalid_field" and e["fatal"] is True
