"""The web app's built files at /app (server/assets.py): the precompressed .gz twin of JS/CSS for clients that
accept gzip, the plain file for the others, a year of caching for hashed assets, no-cache for the rest, and
StaticFiles' own guards (404, no way out of the directory). Last, the real build served by the real app."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from avatarchat.server.assets import IMMUTABLE, WebAppFiles, accepts_gzip
from tests.support.live_app import LiveApp

ROOT = Path(__file__).resolve().parent.parent
WEBAPP = ROOT / "src" / "avatarchat" / "server" / "webapp"
JS = ("const answer = () => 42;\n" * 400).encode()  # compresses well, as real bundles do


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "webapp"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>x</title>")
    (root / "assets" / "index-AbC123.js").write_bytes(JS)
    (root / "assets" / "index-AbC123.js.gz").write_bytes(gzip.compress(JS, 9))
    (root / "assets" / "tiny-Zz9.css").write_text("a{b:c}")  # gzip would not shrink it: no twin
    (tmp_path / "secret.js").write_text("secret")  # beside the directory: never served
    (tmp_path / "secret.js.gz").write_bytes(gzip.compress(b"secret"))
    return root


@pytest.fixture
async def client(site: Path) -> Any:
    app = Starlette(routes=[Mount("/app", WebAppFiles(directory=site))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def raw_get(client: httpx.AsyncClient, path: str, encoding: str | None) -> tuple[httpx.Response, bytes]:
    """The response and its body as sent (httpx would otherwise decode the gzip); None: no Accept-Encoding."""
    request = client.build_request("GET", path)
    if encoding is None:
        del request.headers["Accept-Encoding"]  # httpx sends its own by default
    else:
        request.headers["Accept-Encoding"] = encoding
    r = await client.send(request, stream=True)
    body = b"".join([part async for part in r.aiter_raw()])
    await r.aclose()
    return r, body


async def test_gzip_client_gets_the_precompressed_twin(client: httpx.AsyncClient, site: Path) -> None:
    r, body = await raw_get(client, "/app/assets/index-AbC123.js", "gzip, deflate, br")
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cache-control"] == IMMUTABLE == "public, max-age=31536000, immutable"
    assert r.headers["vary"] == "Accept-Encoding"
    assert int(r.headers["content-length"]) == len(body) < len(JS) // 10
    assert gzip.decompress(body) == (site / "assets" / "index-AbC123.js").read_bytes()


@pytest.mark.parametrize("encoding", [None, "identity", "br", "gzip;q=0", "deflate, gzip; q=0.0"])
async def test_other_clients_get_the_plain_file(client: httpx.AsyncClient, encoding: str | None) -> None:
    r, body = await raw_get(client, "/app/assets/index-AbC123.js", encoding)
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert body == JS and int(r.headers["content-length"]) == len(JS)
    assert r.headers["cache-control"] == IMMUTABLE
    assert r.headers["vary"] == "Accept-Encoding"


async def test_no_twin_serves_the_plain_file(client: httpx.AsyncClient) -> None:
    r, body = await raw_get(client, "/app/assets/tiny-Zz9.css", "gzip")
    assert r.status_code == 200 and body == b"a{b:c}"
    assert "content-encoding" not in r.headers
    assert r.headers["content-type"].startswith("text/css")
    assert r.headers["cache-control"] == IMMUTABLE


async def test_head_and_revalidation(client: httpx.AsyncClient) -> None:
    r, body = await raw_get(client, "/app/assets/index-AbC123.js", "gzip")
    head = await client.head("/app/assets/index-AbC123.js", headers={"Accept-Encoding": "gzip"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == r.headers["content-length"]
    again = await client.get("/app/assets/index-AbC123.js", headers={"Accept-Encoding": "gzip", "If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["cache-control"] == IMMUTABLE
    # The plain file is another representation with its own validator.
    plain = await client.get("/app/assets/index-AbC123.js", headers={"Accept-Encoding": "identity"})
    assert plain.headers["etag"] != r.headers["etag"]


async def test_html_is_revalidated(client: httpx.AsyncClient) -> None:
    r = await client.get("/app/index.html")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
    assert "content-encoding" not in r.headers and "vary" not in r.headers


async def test_missing_files_and_methods(client: httpx.AsyncClient) -> None:
    for path in ("/app/assets/nope-123.js", "/app/assets/nope.css", "/app/nothing"):
        r = await client.get(path, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 404, path
        assert "cache-control" not in r.headers
    r = await client.post("/app/assets/index-AbC123.js", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 405


async def asgi_get(app: Any, path: str, accept_encoding: str) -> tuple[int, bytes]:
    """GET with the path exactly as given (an HTTP client would remove its dot segments)."""
    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"accept-encoding", accept_encoding.encode())], "scheme": "http",
             "server": ("t", 80), "client": ("127.0.0.1", 1), "http_version": "1.1", "asgi": {"version": "3.0"}}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", ["/app/../secret.js", "/app/assets/../../secret.js", "/app/./../secret.js.gz"])
@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_no_way_out_of_the_directory(site: Path, path: str, encoding: str) -> None:
    app = Starlette(routes=[Mount("/app", WebAppFiles(directory=site))])
    status, body = await asgi_get(app, path, encoding)
    assert status == 404
    assert b"secret" not in body and body[:2] != b"\x1f\x8b"


@pytest.mark.parametrize(
    ("header", "ok"),
    [("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("x-gzip", True), ("*", True),
     ("", False), ("identity", False), ("br, zstd", False), ("gzip;q=0", False), ("gzip;q=0.000", False),
     ("*;q=0", False), ("gzip;q=0, *", False), ("br, *;q=0.1", True), ("gzip;q=nonsense", False)],
)
def test_accepts_gzip(header: str, ok: bool) -> None:
    assert accepts_gzip(header) is ok


# The real build (scripts/web_build.sh: Vite writes the .gz twins) served by the real app.

@pytest.mark.skipif(shutil.which("npm") is None, reason="Node.js and npm build the web app (make setup)")
def test_the_real_build_is_served_compressed(live_app: LiveApp) -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "web_build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    built = sorted(p for p in (WEBAPP / "assets").iterdir() if p.suffix in (".js", ".css"))
    assert any(p.name.startswith("index-") and p.suffix == ".js" for p in built)
    for p in built:  # every twin decodes to its file; the big ones all have one
        twin = p.with_name(p.name + ".gz")
        assert twin.is_file() or p.stat().st_size < 1024, p.name
        if twin.is_file():
            assert gzip.decompress(twin.read_bytes()) == p.read_bytes(), p.name

    with httpx.Client(base_url=live_app.http, timeout=10) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
        linked = re.findall(r'(?:src|href)="/app/(assets/[^"]+\.(?:js|css))"', page.text)
        assert any(a.endswith(".js") for a in linked) and any(a.endswith(".css") for a in linked), page.text
        for asset in linked:
            with c.stream("GET", f"/app/{asset}", headers={"Accept-Encoding": "gzip"}) as gz:
                sent = b"".join(gz.iter_raw())
            assert gz.status_code == 200 and gz.headers["content-encoding"] == "gzip", asset
            assert gz.headers["cache-control"] == IMMUTABLE
            assert gzip.decompress(sent) == (WEBAPP / asset).read_bytes()
            plain = c.get(f"/app/{asset}", headers={"Accept-Encoding": "identity"})
            assert "content-encoding" not in plain.headers and plain.content == (WEBAPP / asset).read_bytes()
        assert os.path.getsize(WEBAPP / "index.html") == len(page.content)
