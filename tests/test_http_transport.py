"""The one HTTP/1.1 transport under the router's and the gateway's httpx clients (net/http_transport.py),
against real loopback HTTP servers: raw asyncio ones for exact wire behaviour, and the OpenAI-compatible
test server for SSE streaming."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509  # installed with aiortc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from avatarchat.net.http_transport import PAUSE_READING_AT, HttpTransport
from tests.support.openai_server import Behaviour, OpenAITestServer
from tests.support.redis_celery import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
pytestmark = pytest.mark.timeout(60)
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


class RawServer:
    """A loopback server whose every connection runs ``handler``; counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls = handler, tls
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.CancelledError):
                pass  # the client went away, or the test is over
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()


def client(base: str, *, max_body: int | None = None, **limits: float | int) -> httpx.AsyncClient:
    lim = httpx.Limits(**{"max_connections": 10, "max_keepalive_connections": 10, **limits})  # type: ignore[arg-type]
    return httpx.AsyncClient(base_url=base, transport=HttpTransport(lim, max_body=max_body),
                             timeout=httpx.Timeout(2.0, pool=0.3))


def pool(c: httpx.AsyncClient) -> HttpTransport:
    return c._transport  # type: ignore[return-value]


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        path = head.split(b" ")[1]
        if path == b"/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n")
        elif path == b"/continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
        else:
            out = b"echo:" + head.split(b" ")[0] + b":" + path + b":" + body
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-Test: yes\r\n\r\n" % len(out))
            if not head.startswith(b"HEAD "):
                writer.write(out)
        await writer.drain()


async def test_keep_alive_reuse_chunked_and_bodies() -> None:
    server = RawServer(keep_alive)
    async with server as base, client(base) as c:
        r = await c.post("/a?q=1", content=b"payload")
        assert (r.status_code, r.text, r.headers["x-test"]) == (201, "echo:POST:/a?q=1:payload", "yes")
        r = await c.get("/chunked")
        assert r.text == "hello world"
        r = await c.post("/form", data={"name": "x"}, files={"file": ("f.png", b"\x89PNG data")})
        assert b"f.png" in r.content and b"\x89PNG data" in r.content
        r = await c.head("/h")  # Content-Length but no body
        assert (r.status_code, r.headers["content-length"], r.content) == (201, "13", b"")
        assert (await c.get("/continue")).text == "final"  # an interim 1xx is skipped
        assert (await c.put("/p", content=b"x" * 100_000)).text == "echo:PUT:/p:" + "x" * 100_000
        assert server.connections == 1  # one kept-alive connection carried them all
        results = await asyncio.gather(*(c.get(f"/{i}") for i in range(30)))
        assert [r.text for r in results] == [f"echo:GET:/{i}:" for i in range(30)]
        assert server.connections <= 10 and pool(c).idle_connections() <= 10


async def test_idle_connections_are_capped() -> None:
    server = RawServer(keep_alive)
    async with server as base, client(base, max_keepalive_connections=3) as c:
        await asyncio.gather(*(c.get(f"/{i}") for i in range(10)))
        assert server.connections > 3 and pool(c).idle_connections() == 3
        assert pool(c).limits == (10, 3)


async def test_streams_sse_and_reuses_connections(upstream: OpenAITestServer) -> None:
    upstream.behaviour = Behaviour(reply="answer from a .")
    t = HttpTransport()
    async with httpx.AsyncClient(transport=t, timeout=5) as c:
        for _ in range(3):
            r = await c.get(upstream.base_url + "/models")
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "test-model"
        assert t.idle_connections() == 1  # one connection, reused
        async with c.stream("POST", upstream.base_url + "/chat/completions", json=CHAT) as r:
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
        assert raw.endswith(b"data: [DONE]\n\n") and b"answer" in raw
        r = await c.post(upstream.base_url + "/chat/completions", json={**CHAT, "stream": False})
        assert r.json()["choices"][0]["message"]["content"] == "answer from a ."
        assert t.idle_connections() == 1


async def test_stream_errors_are_httpx_errors(upstream: OpenAITestServer) -> None:
    async with httpx.AsyncClient(transport=HttpTransport(), timeout=httpx.Timeout(5, read=0.3)) as c:
        upstream.behaviour = Behaviour(drop_after_tokens=1)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with c.stream("POST", upstream.base_url + "/chat/completions", json=CHAT) as r:
                [chunk async for chunk in r.aiter_raw()]
        upstream.behaviour = Behaviour(first_token_delay_s=2)
        with pytest.raises(httpx.ReadTimeout):
            async with c.stream("POST", upstream.base_url + "/chat/completions", json=CHAT) as r:
                [chunk async for chunk in r.aiter_raw()]
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.get("ftp://127.0.0.1/x")


async def test_a_connection_the_server_closed_is_replaced() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()  # then the handler returns and the server closes the connection

    server = RawServer(one_then_close)
    async with server as base, client(base) as c:
        assert (await c.get("/")).text == "ok"
        await asyncio.sleep(0.05)
        assert pool(c).idle_connections() == 0  # noticed while idle
        assert (await c.get("/")).text == "ok"
        assert server.connections == 2


async def test_a_stale_connection_is_retried_once_on_a_fresh_one() -> None:
    async def closes_the_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the reused connection: closed before any byte of the response

    server = RawServer(closes_the_second_request)
    async with server as base, client(base) as c:
        assert (await c.get("/")).text == "ok"
        assert (await c.post("/", content=b"body")).text == "ok"  # went out again, on a new connection
        assert server.connections == 2

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server = RawServer(never_answers)
    async with server as base, client(base) as c:
        with pytest.raises(httpx.RemoteProtocolError):  # a fresh connection is not retried
            await c.get("/")
        assert server.connections == 1

    async def half_an_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        await writer.drain()

    server = RawServer(half_an_answer_then_close)
    async with server as base, client(base) as c:
        await c.get("/")
        with pytest.raises(httpx.RemoteProtocolError):  # the server saw it and began to answer: not resent
            await c.get("/")
        assert server.connections == 1


async def test_body_to_end_of_connection_and_connection_close() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    server = RawServer(close_delimited)
    async with server as base, client(base) as c:
        assert (await c.get("/")).text == "all of it"
        assert pool(c).idle_connections() == 0


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
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await c.get("/")


async def test_a_slot_waits_for_a_streamed_body_to_be_closed() -> None:
    server = RawServer(keep_alive)
    async with server as base, client(base, max_connections=1) as c:
        async with c.stream("GET", "/a") as r:
            with pytest.raises(httpx.PoolTimeout):  # the open stream holds the only connection
                await c.get("/b")
            await r.aread()
        assert (await c.get("/b")).text == "echo:GET:/b:"  # closed: free again, and the connection reused
        assert server.connections == 1


async def test_response_bodies_are_bounded() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n" * 1 + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n" + b"x" * 2048)
        await writer.drain()

    async with RawServer(big) as base, client(base, max_body=1500) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="over the limit"):
            await c.get("/length")
        with pytest.raises(httpx.RemoteProtocolError, match="over the limit"):
            await c.get("/chunked")
        assert pool(c).idle_connections() == 0
    async with RawServer(big) as base, client(base, max_body=2048) as c:
        assert len((await c.get("/length")).content) == 2048


async def test_a_slow_reader_pushes_back_on_the_sender() -> None:
    size = 64 * 1024 * 1024
    buffered: list[int] = []

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + bytes(size))
        await asyncio.sleep(0.4)
        buffered.append(writer.transport.get_write_buffer_size())
        await writer.drain()

    async with RawServer(firehose) as base, client(base) as c:
        async with c.stream("GET", "/") as r:
            chunks = r.aiter_raw()
            first = await anext(chunks)
            await asyncio.sleep(0.6)  # not reading: the transport must stop reading the socket
            conn = r.stream._stream._conn  # type: ignore[attr-defined]
            assert conn.buffered <= PAUSE_READING_AT + 1024 * 1024
            total = len(first) + sum([len(chunk) async for chunk in chunks])
        assert total == size
        assert buffered[0] > 8 * 1024 * 1024  # most of the body waited at the server


async def test_write_timeout_when_the_server_does_not_read() -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with RawServer(deaf) as base, client(base) as c:
        with pytest.raises(httpx.WriteTimeout):
            await c.post("/", content=bytes(32 * 1024 * 1024), timeout=httpx.Timeout(2.0, write=0.3))


async def test_closed_transport_refuses() -> None:
    transport = HttpTransport(httpx.Limits(max_connections=2))
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


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_verifies_certificates(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = RawServer(keep_alive, tls=server_tls)
    async with server as base:
        async with client(base) as c:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # default verification
                await c.get("/")
        trusted = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(base_url=base, transport=HttpTransport(ssl_context=trusted)) as c:
            assert (await c.get("/x")).text == "echo:GET:/x:"
            assert (await c.get("/y")).text == "echo:GET:/y:"
        assert server.connections == 1  # the rejected handshake never reached the handler; then one, reused
