"""One lean HTTP/1.1 keep-alive transport under ``httpx.AsyncClient``: asyncio protocols, httptools' C
parser, streamed response bodies with back-pressure, and httpx's ``Limits`` and timeout semantics.

Why not httpx's default transport (httpcore): relaying 200 concurrent SSE streams, httpcore + h11 +
anyio cost ~2/3 of the router's CPU per chunk (profiled); and with ~1000 requests in flight its pool
rescans every queued request on each event (1000 forwards took ~17 s against a 3 s upstream,
bench/forwarding). Here a request costs O(1) pool work: a semaphore bounds the connections, idle ones
wait LIFO per origin, and a request owns its connection from the request line until its response
body is closed.

Used by the LLM router (router/upstream.py: SSE relayed chunk by chunk) and by the gateway's avatar
service client (services/avatar_client.py: small bodies read whole, bounded by ``max_body``).
Kept from httpx: the client API, timeouts (connect/read/write/pool, taken from the request) and
exception types. Not supported: HTTP/2, proxies, TLS client certificates, streamed request bodies
(read whole first). ``https`` URLs get the default certificate verification.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

Origin = tuple[str, str, int]

PAUSE_READING_AT = 256 * 1024  # body bytes buffered, not yet consumed, at which reading pauses
MAX_HEAD = 64 * 1024  # response header bytes
_BIG_BODY = 64 * 1024  # request bodies above this are written separately rather than copied behind the head


class _Conn(asyncio.Protocol):
    """One connection. httptools' callbacks fill in the response in flight; the request side waits on it."""

    def __init__(self, pool: HttpTransport, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = self.done = False  # a request is in flight; its response is complete
        self.in_pool = False  # idle, in the pool
        self.idle_since = 0.0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def start(self, head_request: bool, max_body: int | None) -> None:
        """Ready to receive the response to a new request."""
        self.busy = True
        self.parser = httptools.HttpResponseParser(self)
        self.head_request, self.max_body = head_request, max_body
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = self.body_size = self.buffered = 0
        self.chunks: list[bytes] = []
        self.framed = False  # Content-Length or chunked: else the body runs to the end of the connection
        self.headers_done = self.done = self.keep_alive = self.got_data = self._paused = False
        self.error: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:  # nobody asked (a 408 before a close, say): the connection can't be trusted
            if self.in_pool:
                self.pool._forget(self)
            self.close()
            return
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_pool:
            self.pool._forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self.busy or self.done:
            return
        if self.headers_done and not self.framed and exc is None:
            self.done, self.keep_alive = True, False  # a body delimited by the end of the connection
            self._wake()
        elif exc is not None:
            self._fail(httpx.ReadError(f"{type(exc).__name__}: {exc}"))
        elif self.got_data:
            self._fail(httpx.RemoteProtocolError("peer closed connection without sending complete message body"))
        else:
            self._fail(httpx.RemoteProtocolError("server closed the connection without sending a response"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            self._fail(httpx.RemoteProtocolError("response head over the limit"))
        elif len(name) == 14 and name.lower() == b"content-length":
            self.framed = True
            if self.max_body is not None and value.isdigit() and int(value) > self.max_body:
                self._fail(httpx.RemoteProtocolError(f"response body over the limit ({self.max_body} bytes)"))
        elif len(name) == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim response: the real one follows
            self.headers, self.head_size = [], 0
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.head_request:
            self.done = True  # no body, whatever Content-Length says
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done or self.error is not None:
            return
        self.body_size += len(body)
        if self.max_body is not None and self.body_size > self.max_body:
            self.chunks.clear()
            self._fail(httpx.RemoteProtocolError(f"response body over the limit ({self.max_body} bytes)"))
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_READING_AT and not self._paused and self.transport is not None:
            self._paused = True  # the reader fell behind: let TCP push back on the sender
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.done = True
            self._wake()

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            self.error = e
        self.close()  # the stream is out of step: the connection can't carry another request
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _timed_out(self, w: asyncio.Future[None]) -> None:
        if not w.done():
            w.set_exception(httpx.ReadTimeout("timed out waiting for the response"))

    async def _wait(self, timeout: float | None) -> None:
        # A bare timer rather than asyncio.timeout(): this runs once per streamed chunk.
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        h = loop.call_later(timeout, self._timed_out, w) if timeout is not None else None
        try:
            await w
        finally:
            self._waiter = None
            if h is not None:
                h.cancel()

    async def drain(self, timeout: float | None) -> None:
        """Wait until the socket takes the request (only when the send buffer is full)."""
        while self._write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drain
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            finally:
                self._drain = None

    async def read_headers(self, timeout: float | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if self.headers_done:
                return
            await self._wait(timeout)

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        while True:
            if self.chunks:
                # Everything that has arrived, in one piece: a consumer that fell behind catches up in one step.
                chunks = self.chunks
                chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.chunks, self.buffered = [], 0
                if self._paused:
                    self._paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                return chunk
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            await self._wait(timeout)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; closing it hands the connection back (or closes it) and frees its slot."""

    def __init__(self, pool: HttpTransport, conn: _Conn, read_timeout: float | None) -> None:
        self._pool, self._conn, self._timeout = pool, conn, read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, timeout = self._conn, self._timeout
        if conn is None:
            raise httpx.StreamClosed()
        while (chunk := await conn.next_chunk(timeout)) is not None:
            yield chunk

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._finish(conn)


class HttpTransport(httpx.AsyncBaseTransport):
    """``limits`` as httpx reads them: ``max_connections`` in use or idle (more requests wait up to the
    pool timeout, then ``PoolTimeout``), ``max_keepalive_connections`` idle ones kept, each for at most
    ``keepalive_expiry`` s; ``None`` is no limit. ``max_body`` bounds a response body (bytes)."""

    def __init__(self, limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                           keepalive_expiry=5.0),
                 *, max_body: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._max_body = max_body
        self._ssl = ssl_context
        self._slots: asyncio.Semaphore | None = None  # made on first use, on the running loop
        self._idle: dict[Origin, deque[_Conn]] = {}  # newest on the right; entries not in_pool are dead
        self._n_idle = 0
        self._closed = False

    @property
    def limits(self) -> tuple[int | None, int | None]:
        """(max connections, max idle kept-alive connections)."""
        return self._max, self._max_idle

    def idle_connections(self) -> int:
        return self._n_idle

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.TransportError("the transport is closed")
        url = request.url
        if url.scheme == "http":
            origin = ("http", url.host, url.port or 80)
        elif url.scheme == "https":
            origin = ("https", url.host, url.port or 443)
        else:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        t = request.extensions.get("timeout", {})
        slots = self._slots
        if slots is None and self._max is not None:
            slots = self._slots = asyncio.Semaphore(self._max)
        if slots is not None:
            if slots.locked():
                try:
                    async with asyncio.timeout(t.get("pool")):
                        await slots.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout(f"no free connection within {t.get('pool')} s") from None
            else:
                await slots.acquire()  # free: returns at once
        try:
            head, body = self._serialize(request, await request.aread())
            conn = self._checkout(origin)
            if conn is not None:
                try:
                    return await self._send(conn, request, head, body, t)
                except (httpx.NetworkError, httpx.RemoteProtocolError):
                    if conn.got_data:
                        raise
                    # The peer closed this kept-alive connection before our request reached it: once more, on a fresh one.
            conn = await self._connect(origin, t.get("connect"))
            return await self._send(conn, request, head, body, t)
        except BaseException:
            if slots is not None:
                slots.release()
            raise

    @staticmethod
    def _serialize(request: httpx.Request, body: bytes) -> tuple[bytes, bytes]:
        lines = [request.method.encode() + b" " + request.url.raw_path + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
                continue  # the body is whole by now: it is sent with a Content-Length
            lines.append(name + b": " + value)
        if body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n", body

    async def _send(self, conn: _Conn, request: httpx.Request, head: bytes, body: bytes,
                    t: dict[str, float | None]) -> httpx.Response:
        conn.start(request.method == "HEAD", self._max_body)
        assert conn.transport is not None
        try:
            if len(body) > _BIG_BODY:
                conn.transport.write(head)
                conn.transport.write(body)
            else:
                conn.transport.write(head + body)
            if conn._write_paused:
                await conn.drain(t.get("write"))
            await conn.read_headers(t.get("read"))
        except BaseException:
            conn.busy = False
            conn.close()
            raise
        return httpx.Response(conn.status, headers=conn.headers, stream=_Body(self, conn, t.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    def _checkout(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if not conn.in_pool:
                continue  # closed by the peer while idle
            conn.in_pool = False
            self._n_idle -= 1
            if self._expiry is not None and now - conn.idle_since >= self._expiry:
                conn.close()
                continue
            return conn
        return None

    def _finish(self, conn: _Conn) -> None:
        """The response is closed: keep the connection if it can carry another request, and free its slot."""
        conn.busy = False
        if (conn.done and conn.keep_alive and not conn.closed and conn.error is None and not self._closed
                and (self._max_idle is None or self._n_idle < self._max_idle)):
            idle = self._idle.get(conn.origin)
            if idle is None:
                idle = self._idle[conn.origin] = deque()
            now = time.monotonic()
            # Drop what is dead or expired at the old end, so an origin's idle list can't grow without bound.
            while idle and (not idle[0].in_pool or (self._expiry is not None and now - idle[0].idle_since >= self._expiry)):
                old = idle.popleft()
                if old.in_pool:
                    old.in_pool = False
                    self._n_idle -= 1
                    old.close()
            conn.idle_since = now
            conn.in_pool = True
            self._n_idle += 1
            idle.append(conn)
        else:
            conn.close()
        if self._slots is not None:
            self._slots.release()

    def _forget(self, conn: _Conn) -> None:
        """An idle connection the peer closed: it no longer counts (its entry is dropped lazily)."""
        conn.in_pool = False
        self._n_idle -= 1

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # made on first https use: start-up doesn't pay for it
        return self._ssl

    async def _connect(self, origin: Origin, timeout: float | None) -> _Conn:
        scheme, host, port = origin
        tls = self._ssl_context() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Conn(self, origin), host, port, ssl=tls,
                                                       server_hostname=host if tls is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from None
        except OSError as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e} ({host}:{port})") from None
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                conn = idle.pop()
                if conn.in_pool:
                    conn.in_pool = False
                    self._n_idle -= 1
                    conn.close()
        self._idle.clear()
