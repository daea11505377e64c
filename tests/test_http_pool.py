"""The gateway's keep-alive pool (services/http_pool.py) against real loopback HTTP servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from avatarchat.services.http_pool import PooledTransport
from tests.support.redis_celery import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
pytestmark = pytest.mark.timeout(60)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class RawServer:
    """A loopback server whose every connection runs ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def client(base: str, **limits: float | int) -> httpx.AsyncClient:
    lim = httpx.Limits(**{"max_connections": 10, "max_keepalive_connections": 10, **limits})  # type: ignore[arg-type]
    return httpx.AsyncClient(base_url=base, transport=PooledTransport(lim), timeout=httpx.Timeout(2.0, pool=0.3))


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        path = head.split(b" ")[1]
        if path == b"/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6; x=1\r\n world\r\n0\r\n\r\n")
        else:
            out = b"echo:" + path + b":" + body
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-Test: yes\r\n\r\n%s" % (len(out), out))
        await writer.drain()


async def test_keep_alive_reuse_chunked_and_bodies() -> None:
    server = RawServer(keep_alive)
    async with server as base, client(base) as c:
        r = await c.post("/a?q=1", content=b"payload")
        assert (r.status_code, r.text, r.headers["x-test"]) == (201, "echo:/a?q=1:payload", "yes")
        r = await c.get("/chunked")
        assert r.text == "hello world"
        r = await c.post("/form", data={"name": "x"}, files={"file": ("f.png", b"\x89PNG data")})
        assert b"f.png" in r.content and b"\x89PNG data" in r.content
        assert server.connections == 1  # one kept-alive connection carried all three
        results = await asyncio.gather(*(c.get(f"/{i}") for i in range(30)))
        assert [r.text for r in results] == [f"echo:/{i}:" for i in range(30)]
        assert server.connections <= 10 and c._transport.idle_connections() <= 10  # type: ignore[attr-defined]


async def test_a_connection_the_server_closed_is_replaced() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()  # then the handler returns and the server closes the connection

    server = RawServer(one_then_close)
    async with server as base, client(base) as c:
        assert (await c.get("/")).text == "ok"
        await asyncio.sleep(0.05)
        assert (await c.get("/")).text == "ok"
        assert server.connections == 2


async def test_body_to_end_of_connection_and_connection_close() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    server = RawServer(close_delimited)
    async with server as base, client(base) as c:
        assert (await c.get("/")).text == "all of it"
        assert c._transport.idle_connections() == 0  # type: ignore[attr-defined]


async def test_errors_are_httpx_errors() -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with RawServer(silent) as base, client(base, max_connections=1) as c:
        slow = asyncio.create_task(c.get("/", timeout=httpx.Timeout(0.5, pool=0.3)))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):  # the one connection is busy
            await c.get("/")
        with pytest.raises(httpx.ReadTimeout):
            await slow

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
        await writer.drain()

    async with RawServer(garbage) as base, client(base) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get("/")

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await writer.drain()

    async with RawServer(truncated) as base, client(base) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="ended early"):
            await c.get("/")


async def test_closed_transport_refuses() -> None:
    transport = PooledTransport(httpx.Limits(max_connections=2))
    await transport.aclose()
    async with httpx.AsyncClient(transport=transport) as c:
        with pytest.raises(httpx.TransportError, match="closed"):
            await c.get("http://127.0.0.1:1/")


async def test_expired_idle_connections_are_not_reused() -> None:
    server = RawServer(keep_alive)
    async with server as base, client(base, keepalive_expiry=0.05) as c:
        await c.get("/1")
        time.sleep(0.1)
        await c.get("/2")
        assert server.connections == 2
