"""The gateway's relay of the read-only avatar routes (server/relay.py), against scripted upstreams on loopback:
answers pass through as they are, errors become the gateway's JSON errors, a broken answer is never passed off
as whole."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from avatarchat.config import AvatarClientConfig
from avatarchat.server.relay import RELAYED, Relay, RelayMiddleware
from avatarchat.services.avatar_client import AvatarServiceError, HttpAvatarService
from tests.support.redis_celery import free_port

pytestmark = pytest.mark.timeout(60)


class Upstream:
    """A raw HTTP/1.1 server that answers every request with the bytes given, then closes; it records what it got."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    async with Upstream(request.param) as u:
        yield u


def gateway(url: str) -> tuple[Starlette, HttpAvatarService]:
    """The relay in front of an app that answers everything else with 418, as in the gateway role."""

    async def rest(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"not relayed"})

    app = Starlette()
    app.mount("/", rest)
    app.add_middleware(RelayMiddleware)
    service = HttpAvatarService(AvatarClientConfig(url=url, connect_timeout_s=1, read_timeout_s=2))
    app.state.avatar_service = service
    return app, service


async def call(app: Starlette, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
        return await client.request(method, path)


BODY = b'{"avatars": [{"name": "default"}]}'
OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Internal: secret\r\n"
      b"Set-Cookie: s=1\r\n\r\n%s" % (len(BODY), BODY))


@pytest.mark.parametrize("upstream", [OK], indirect=True)
async def test_an_answer_passes_through_as_it_is(upstream: Upstream) -> None:
    app, service = gateway(upstream.url)
    r = await call(app, "GET", "/api/avatar/preview?name=default&size=64")
    assert r.status_code == 200 and r.content == BODY
    assert r.headers["content-type"] == "application/json" and r.headers["content-length"] == str(len(BODY))
    # Only the answer's own description passes: no cookies or internal headers of the avatar service.
    assert "x-internal" not in r.headers and "set-cookie" not in r.headers
    request_line, *headers = upstream.requests[0].decode().split("\r\n")
    assert request_line == "GET /api/avatar/preview?name=default&size=64 HTTP/1.1"
    assert "Accept-Encoding: identity" in headers  # relayed bytes must not be compressed for us only
    await service.close()


@pytest.mark.parametrize("upstream", [OK], indirect=True)
async def test_only_the_read_routes_are_relayed(upstream: Upstream) -> None:
    app, service = gateway(upstream.url)
    assert set(RELAYED) == {"/api/avatar/list", "/api/avatar/preview", "/api/tts/models"}
    for path in RELAYED:
        assert (await call(app, "GET", path)).content == BODY
    assert (await call(app, "POST", "/api/avatar/list")).status_code == 418  # writes go to the full routes
    assert (await call(app, "GET", "/api/avatar/list/../delete")).status_code == 418
    assert (await call(app, "GET", "/api/avatar/add")).status_code == 418
    assert len(upstream.requests) == len(RELAYED)
    await service.close()


def answer(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    ("upstream", "status", "detail"),
    [
        (answer("404 Not Found", b'{"detail": "no such thing"}'), 404, "avatar service: no such thing"),
        (answer("500 Internal Server Error", b"oops", "text/plain"), 502, "avatar service: oops"),
        (answer("503 Busy", b"[1,2]"), 503, "avatar service: [1,2]"),
    ],
    indirect=["upstream"],
)
async def test_errors_are_the_gateways_json_errors(upstream: Upstream, status: int, detail: str) -> None:
    app, service = gateway(upstream.url)
    r = await call(app, "GET", "/api/avatar/list")
    assert r.status_code == status and r.json() == {"detail": detail}
    await service.close()


async def test_an_unreachable_avatar_service_is_a_502() -> None:
    app, service = gateway(f"http://127.0.0.1:{free_port()}")
    r = await call(app, "GET", "/api/tts/models")
    assert r.status_code == 502 and r.json()["detail"].startswith("avatar service unreachable")
    with pytest.raises(AvatarServiceError) as e:
        await service.relay("/api/avatar/list")
    assert e.value.status == 502
    await service.close()


@pytest.mark.parametrize("upstream", [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100], indirect=True)
async def test_a_broken_off_answer_is_never_completed(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """The status is out when the avatar service breaks off: the relay must not end the body as if it were whole."""
    _, service = gateway(upstream.url)
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/api/avatar/list", "query_string": b"",
             "app": type("App", (), {"state": type("State", (), {"avatar_service": service})})}
    with caplog.at_level(logging.WARNING, logger="avatarchat.server.relay"):
        await Relay("/api/avatar/list")(scope, receive, send)
    assert messages[0]["status"] == 200
    assert all(m.get("more_body") for m in messages[1:])  # no final message: the server cuts the connection
    assert "broke off" in caplog.text
    assert service._transport.idle_connections() == 0  # type: ignore[attr-defined]
    await service.close()


@pytest.mark.parametrize("upstream", [OK], indirect=True)
async def test_the_relay_sends_the_service_token(upstream: Upstream) -> None:
    service = HttpAvatarService(AvatarClientConfig(url=upstream.url), token="t0k")
    r = await service.relay("/api/avatar/list")
    await r.aread()
    await r.aclose()
    assert "Authorization: Bearer t0k" in upstream.requests[0].decode().split("\r\n")
    await service.close()


async def test_an_empty_service_token_is_refused() -> None:
    from avatarchat.server.service_auth import ServiceTokenMiddleware

    with pytest.raises(ValueError):
        ServiceTokenMiddleware(Starlette(), token="")
