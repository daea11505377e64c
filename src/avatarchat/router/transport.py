"""A lean HTTP/1.1 transport for the router's ``httpx.AsyncClient``: asyncio protocols with httptools'
C parser and a keep-alive pool.

Why: relaying 200 concurrent streams, httpcore + h11 + anyio cost ~2/3 of the router's CPU per chunk
(profiled). The client API, timeouts and error types stay httpx's; only the wire layer changes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

_MAX_BUFFERED = 256  # chunks held before reading from the socket pauses (back-pressure until the next read)


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.headers_done = False
        self.done = False
        self.error: Exception | None = None
        self.keep_alive = False
        self.got_data = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.done:
            self._fail(httpx.RemoteProtocolError("peer closed connection without sending complete message body"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))
        if len(self.chunks) > _MAX_BUFFERED and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            self.error = e
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the upstream") from None
        finally:
            self._waiter = None

    async def read_headers(self, timeout: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self.wait(timeout)

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        while True:
            if self.chunks:
                # Everything that has arrived, in one piece: a consumer that fell behind catches up in one step.
                chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.done:
                return None
            if self.error is not None:
                raise self.error
            await self.wait(timeout)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: LeanTransport, key: tuple[str, str, int], conn: _Conn, read_timeout: float | None) -> None:
        self._pool, self._key, self._conn, self._timeout = pool, key, conn, read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.next_chunk(self._timeout)) is not None:
            yield chunk

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        c = self._conn
        if c.done and c.keep_alive and not c.closed and c.error is None:
            self._pool._release(self._key, c)
        else:
            c.close()


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, ssl_context: ssl.SSLContext | None = None, max_idle_per_host: int = 512) -> None:
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._max_idle = max_idle_per_host

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # made on first https use: start-up doesn't pay for it
        return self._ssl

    def _release(self, key: tuple[str, str, int], c: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._max_idle:
            c._reset()
            idle.append(c)
        else:
            c.close()

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Conn:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    _Conn, host, port, ssl=self._ssl_context() if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as e:
            raise httpx.ConnectError(f"{e.strerror or e} ({host}:{port})") from None
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        t = request.extensions.get("timeout", {})
        body = await request.aread()
        head = [f"{request.method} ".encode() + url.raw_path + b" HTTP/1.1\r\n"]
        head += [k + b": " + v + b"\r\n" for k, v in request.headers.raw]
        payload = b"".join(head) + b"\r\n" + body
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await self._send(conn, key, payload, t.get("read"))
            except httpx.RemoteProtocolError:
                if conn.got_data:
                    raise
                # The server closed this idle connection before we used it: try a fresh one.
        conn = await self._connect(key, t.get("connect"))
        return await self._send(conn, key, payload, t.get("read"))

    async def _send(self, conn: _Conn, key: tuple[str, str, int], payload: bytes, read_timeout: float | None) -> httpx.Response:
        assert conn.transport is not None
        conn.transport.write(payload)
        try:
            await conn.read_headers(read_timeout)
        except BaseException:
            conn.close()
            raise
        return httpx.Response(conn.status, headers=conn.headers, stream=_Body(self, key, conn, read_timeout),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for c in idle:
                c.close()
        self._idle.clear()
