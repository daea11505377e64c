"""Issue 14's low items on what a client may send: non-finite numbers, request head size, WebSocket frame size."""

from __future__ import annotations

import contextlib
import select
import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from avatarchat.config import ConfigError, load_settings
from tests.support.live_app import LiveApp
from tests.test_server import open_client

CHAT = '{"messages": [{"role": "user", "content": "hi"}], %s}'


@pytest.mark.parametrize("field", ['"temperature": NaN', '"temperature": Infinity', '"temperature": -Infinity',
                                   '"max_tokens": NaN'])
def test_non_finite_numbers_are_a_422_with_a_message(live_app: LiveApp, field: str) -> None:
    """Python's JSON reads the NaN and Infinity literals; the validation error echoing them back was a 500."""
    for path in ("/api/llm/chat", "/api/llm/tasks"):
        r = httpx.post(live_app.http + path, content=CHAT % field, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"][-1] == field.split('"')[1] and detail["msg"], detail
    r = httpx.post(live_app.http + "/api/llm/chat", content=CHAT % '"temperature": NaN',
                   headers={"content-type": "application/json"})
    assert "finite number" in r.json()["detail"][0]["msg"]


def _send_head(port: int, head: bytes, chunk: int = 1 << 16) -> tuple[bytes, int, float]:
    """Send a request head in pieces, stopping once the server answers; (its answer, bytes sent, seconds)."""
    start = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(0, len(head), chunk):
                if select.select([s], [], [], 0)[0]:
                    break  # answered (or closed) before the head ended
                s.sendall(head[i : i + chunk])
                sent += min(chunk, len(head) - i)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while part := s.recv(65536):  # to the server's end of the connection (bounded by the timeout)
                answer += part
    return answer, sent, time.monotonic() - start


def test_a_huge_request_header_is_refused_and_not_kept(live_app: LiveApp) -> None:
    limit = live_app.settings.server.max_header_bytes
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    answer, _, seconds = _send_head(live_app.port, big)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert seconds < 5
    # A head that never ends: the server stops reading it near the limit, it does not buffer 64 MB of it.
    endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20)
    answer, sent, seconds = _send_head(live_app.port, endless)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert sent < 16 << 20, sent  # the limit plus what the sockets' buffers held
    # Many headers add up the same way.
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(2000))
    assert _send_head(live_app.port, many + b"\r\n")[0].startswith(b"HTTP/1.1 431")
    # Below the limit all is as before; the server is up.
    ok = httpx.get(live_app.http + "/health", headers={"X-Fine": "c" * (limit // 2)})
    assert ok.status_code == 200
    r = httpx.post(live_app.http + "/api/llm/chat", content=CHAT % '"max_tokens": 0',
                   headers={"content-type": "application/json", "X-Fine": "c" * (limit // 2)})
    assert r.status_code == 422  # a body after a large head is read as usual


async def test_a_frame_over_the_app_limit_is_an_error_event_and_an_absurd_one_closes(live_app: LiveApp) -> None:
    server = live_app.settings.server
    c = await open_client(live_app)
    try:
        for size in (server.max_message_bytes + 1, 1 << 20, 3 << 20):
            await c.ws.send("x" * size)
            e = await c.event()
            assert e["type"] == "error" and e["code"] == "message_too_large" and e["fatal"] is False, (size, e)
            await c.send(type="ping", id=size)
            assert await c.event() == {"type": "pong", "id": size}  # the session goes on
        await c.ws.send(b"AC\x01\x02\x00\x00\x00\x00" + bytes(2 << 20))  # binary: the audio frame limit
        assert (await c.event())["code"] == "audio_too_large"
        await c.ws.send("x" * (server.max_frame_bytes + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await c.event(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        await c.ws.close()
    assert httpx.get(live_app.http + "/health").status_code == 200


def test_the_frame_bound_is_never_below_the_message_limit() -> None:
    with pytest.raises(ConfigError, match="max_frame_bytes must be at least"):
        load_settings(server={"max_message_bytes": 8 << 20})
    assert load_settings(server={"max_message_bytes": 8 << 20, "max_frame_bytes": 8 << 20}).server.max_frame_bytes == 8 << 20
