"""Clients that stop reading (issue 14): they are told why when their socket still takes it, disconnected, and
their session slot is freed for everyone else."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import pytest

from avatarchat.config import load_settings
from tests.support.live_app import LiveApp
from tests.support.openai_server import Behaviour, OpenAITestServer


@pytest.fixture(scope="module")
def small_app(openai_server: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    settings = load_settings(
        session={"max_sessions": 1, "idle_timeout_s": 6.0},
        server={"send_timeout_s": 2.0, "max_send_buffer_bytes": 64 * 1024},
        llm={"engine": "openai", "openai": {"base_url": openai_server.base_url, "model": "test-model"}},
        avatar={"dir": str(tmp_path_factory.mktemp("avatars"))},
    )
    app = LiveApp(settings).start()
    yield app
    app.stop()


def _frame(text: str) -> bytes:
    """A masked client text frame."""
    data, mask = text.encode(), os.urandom(4)
    head = bytes([0x81])
    n = len(data)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _stalled_client(port: int, question: bool = True) -> socket.socket:
    """A WebSocket client that sends a question and then never reads (a tiny receive window)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)  # the handshake only; the session event stays unread
    assert b" 101 " in head.split(b"\r\n")[0], head
    if question:
        s.sendall(_frame(json.dumps({"type": "user_text", "text": "Tell me a very long story."})))
    return s


def _sessions(app: LiveApp) -> int:
    return int(httpx.get(app.http + "/api/monitor", timeout=10).json()["sessions"])


def test_a_client_that_stops_reading_is_disconnected_and_frees_its_slot(small_app: LiveApp,
                                                                        upstream: OpenAITestServer) -> None:
    upstream.behaviour = Behaviour(reply=" ".join(["Once upon a time there was a dragon, and it spoke."] * 40))
    stalled = _stalled_client(small_app.port)
    try:
        start = time.monotonic()
        deadline = start + 60
        while _sessions(small_app) and time.monotonic() < deadline:
            time.sleep(0.2)
        freed_after = time.monotonic() - start
        assert _sessions(small_app) == 0, "the stalled client still holds the only session slot"
        # Its slot is free: a reading client gets a session and a whole reply.
        upstream.behaviour = Behaviour()
        from websockets.sync.client import connect

        with connect(small_app.ws, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "session"
            ws.send(json.dumps({"type": "user_text", "text": "Hi?"}))
            while (e := ws.recv(timeout=60)) and (isinstance(e, bytes) or json.loads(e)["type"] != "turn_done"):
                pass
            assert json.loads(e)["reason"] == "complete"
        # The server closed the stalled connection too (it does not keep it, and its buffers, open).
        stalled.settimeout(20)
        with pytest.raises(ConnectionResetError):
            while stalled.recv(1 << 16):
                pass
            raise ConnectionResetError("closed in order")  # an orderly close after the data counts too
        assert freed_after < 30, freed_after
    finally:
        stalled.close()


def test_a_silent_client_that_never_reads_is_closed_at_the_idle_timeout(small_app: LiveApp) -> None:
    """Nothing to send it, nothing from it: the idle close ends its session even though it never answers."""
    stalled = _stalled_client(small_app.port, question=False)
    try:
        start = time.monotonic()
        while _sessions(small_app) == 0 and time.monotonic() < start + 10:
            time.sleep(0.05)
        assert _sessions(small_app) == 1
        while _sessions(small_app) and time.monotonic() < start + 60:
            time.sleep(0.2)
        assert _sessions(small_app) == 0
        assert time.monotonic() - start < 6.0 + 10
    finally:
        stalled.close()
