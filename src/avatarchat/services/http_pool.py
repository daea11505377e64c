"""An asyncio-native HTTP/1.1 keep-alive pool, as the transport under the gateway's ``httpx.AsyncClient``.

Why not httpx's default transport (httpcore): with many requests in flight its pool rescans every
queued request against every connection on each event, so 1000 concurrent forwards took ~17 s of
mostly pool bookkeeping against a 3 s upstream (bench/forwarding). This pool is O(1) per request:
a semaphore bounds the connections, idle ones wait in a LIFO per origin, and each request owns its
connection from the request line to the end of the response.

It keeps httpx's interface: timeouts (connect/read/write/pool) come from the request, errors are
httpx's exceptions. Responses are read whole (the avatar API's answers are small; ``max_body``
bounds them). No HTTP/2, no proxies, no TLS client certificates: the avatar service is on a trusted
network, and ``https`` URLs get default TLS verification.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

import httpx

_MAX_HEAD = 64 * 1024


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)
    used: bool = False

    def close(self) -> None:
        self.writer.close()


class PooledTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, max_body: int = 64 * 1024 * 1024) -> None:
        self._max = limits.max_connections or 100
        self._max_idle = limits.max_keepalive_connections if limits.max_keepalive_connections is not None else self._max
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0
        self._max_body = max_body
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[tuple[str, str, int], deque[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    @property
    def limits(self) -> tuple[int, int]:
        return self._max, self._max_idle

    def idle_connections(self) -> int:
        return sum(len(q) for q in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.TransportError("the transport is closed", request=request)
        t = request.extensions.get("timeout", {})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        try:
            async with asyncio.timeout(t.get("pool")):
                await self._slots.acquire()
        except TimeoutError as e:
            raise httpx.PoolTimeout(f"no free connection within {t.get('pool')} s", request=request) from e
        try:
            body = await request.aread()
            for attempt in (0, 1):
                conn = await self._checkout(request, t.get("connect"))
                try:
                    return await self._exchange(conn, request, body, t)
                except _StaleConnection:
                    conn.close()
                    if attempt == 1 or not conn.used:
                        raise httpx.RemoteProtocolError("server closed the connection", request=request) from None
                    # A kept-alive connection the server had already closed: once more, on a fresh one.
                except BaseException:
                    conn.close()
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._slots.release()

    async def _checkout(self, request: httpx.Request, connect_timeout: float | None) -> _Conn:
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if now - conn.idle_since < self._expiry and not conn.reader.at_eof():
                conn.used = True
                return conn
            conn.close()
        ssl_ctx = None
        if url.scheme == "https":
            self._ssl = self._ssl or ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(key[1], key[2], ssl=ssl_ctx, limit=_MAX_HEAD)
        except TimeoutError as e:
            raise httpx.ConnectTimeout(f"connect to {key[1]}:{key[2]} timed out", request=request) from e
        except OSError as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}", request=request) from e
        return _Conn(reader, writer)

    def _checkin(self, request: httpx.Request, conn: _Conn) -> None:
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _exchange(self, conn: _Conn, request: httpx.Request, body: bytes, t: dict[str, float | None]) -> httpx.Response:
        target = request.url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1".encode()]
        for name, value in request.headers.raw:
            if name.lower() in (b"transfer-encoding", b"content-length"):
                continue
            lines.append(name + b": " + value)
        if body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        try:
            async with asyncio.timeout(t.get("write")):
                conn.writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                await conn.writer.drain()
        except TimeoutError as e:
            raise httpx.WriteTimeout("write timed out", request=request) from e
        except ConnectionError as e:
            raise _StaleConnection from e
        try:
            async with asyncio.timeout(t.get("read")):
                status, headers, keep_alive = await self._read_head(conn, request)
                content, reusable = await self._read_body(conn, request, status, headers)
        except TimeoutError as e:
            raise httpx.ReadTimeout("read timed out", request=request) from e
        except (asyncio.LimitOverrunError, ValueError) as e:
            raise httpx.RemoteProtocolError(f"malformed response: {e}", request=request) from e
        if keep_alive and reusable:
            self._checkin(request, conn)
        else:
            conn.close()
        return httpx.Response(status, headers=headers, content=content, request=request,
                              extensions={"http_version": b"HTTP/1.1"})

    async def _read_head(self, conn: _Conn, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], bool]:
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise _StaleConnection from e
            raise httpx.RemoteProtocolError("response ended inside its head", request=request) from e
        except ConnectionError as e:
            raise _StaleConnection from e
        status_line, *header_lines = head[:-4].split(b"\r\n")
        version, code, *_ = status_line.split(b" ", 2)
        headers = []
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"bad header line {line[:80]!r}")
            headers.append((name.strip(), value.strip()))
        conn_header = b",".join(v for k, v in headers if k.lower() == b"connection").lower()
        keep_alive = version == b"HTTP/1.1" and b"close" not in conn_header
        return int(code), headers, keep_alive

    async def _read_body(self, conn: _Conn, request: httpx.Request, status: int,
                         headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
        """The body, and whether the connection can carry another request."""
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b"", True
        lower = {k.lower(): v for k, v in headers}
        try:
            if b"chunked" in lower.get(b"transfer-encoding", b"").lower():
                parts = []
                size = 0
                while True:
                    line = await conn.reader.readuntil(b"\r\n")
                    n = int(line.split(b";", 1)[0], 16)
                    size += n
                    if size > self._max_body:
                        raise httpx.RemoteProtocolError("response body over the limit", request=request)
                    if n == 0:
                        while (await conn.reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                            pass
                        return b"".join(parts), True
                    parts.append(await conn.reader.readexactly(n))
                    await conn.reader.readexactly(2)
            if b"content-length" in lower:
                n = int(lower[b"content-length"])
                if n > self._max_body:
                    raise httpx.RemoteProtocolError("response body over the limit", request=request)
                return await conn.reader.readexactly(n), True
            data = await conn.reader.read(self._max_body + 1)
            rest = bytearray(data)
            while data and len(rest) <= self._max_body:
                data = await conn.reader.read(self._max_body + 1 - len(rest))
                rest += data
            if len(rest) > self._max_body:
                raise httpx.RemoteProtocolError("response body over the limit", request=request)
            return bytes(rest), False  # delimited by the end of the connection
        except asyncio.IncompleteReadError as e:
            raise httpx.RemoteProtocolError("response body ended early", request=request) from e
        except ConnectionError as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from e

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


class _StaleConnection(Exception):
    """The server closed the connection before sending a byte of the response."""
