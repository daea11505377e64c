"""The avatar service API (seed 000's paths) against the real app, and the store's crash safety."""

from __future__ import annotations

import contextlib
import io
import select
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from skimage import data
from websockets.asyncio.client import connect

from avatarchat.services.avatar_store import AvatarStore, AvatarStoreError, decode_image
from tests.support.live_app import LiveApp


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims huge dimensions: a decompression bomb in miniature."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut_png() -> bytes:
    return png(data.astronaut())


def upload(app: LiveApp, name: str, content: bytes, filename: str = "portrait.png") -> httpx.Response:
    return httpx.post(app.http + "/api/avatar/add", data={"name": name}, files={"file": (filename, content)}, timeout=60)


def test_list_preview_and_tts_models(live_app: LiveApp) -> None:
    listed = httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]
    assert listed[0]["name"] == "default" and listed[0]["builtin"]
    r = httpx.get(live_app.http + "/api/avatar/preview", params={"name": "default", "size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (128, 128, 3)
    assert httpx.get(live_app.http + "/api/avatar/preview", params={"name": "nobody"}).status_code == 404
    assert httpx.get(live_app.http + "/api/avatar/preview", params={"name": "../etc"}).status_code == 400
    assert httpx.get(live_app.http + "/api/avatar/preview", params={"name": "default", "size": 99999}).status_code == 422
    tts = httpx.get(live_app.http + "/api/tts/models").json()
    assert tts["engine"] == "piper" and "piper" in tts["engines"] and tts["voices"]


async def test_upload_start_use_and_delete(live_app: LiveApp, astronaut_png: bytes) -> None:
    r = upload(live_app, "astro", astronaut_png, "astronaut.png")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "astro" and r.json()["width"] == 512
    names = [a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]]
    assert "astro" in names
    assert upload(live_app, "astro", astronaut_png).status_code == 409
    prev = httpx.get(live_app.http + "/api/avatar/preview", params={"name": "astro"})
    assert prev.status_code == 200
    started = httpx.post(live_app.http + "/api/avatar/start", json={"name": "astro"}, timeout=30).json()
    assert started == {"name": "astro", "ready": True, "width": 512, "height": 512, "fps": 25}
    # A session can use it, and while it does, it can't be deleted.
    async with connect(live_app.ws + "?avatar=astro") as ws:
        import json

        hello = json.loads(await ws.recv())
        assert hello["type"] == "session" and hello["avatar"] == "astro"
        busy = httpx.post(live_app.http + "/api/avatar/delete", json={"name": "astro"})
        assert busy.status_code == 409 and "in use" in busy.json()["detail"]
    import asyncio

    for _ in range(50):  # the session closes asynchronously
        r = httpx.post(live_app.http + "/api/avatar/delete", json={"name": "astro"})
        if r.status_code != 409:
            break
        await asyncio.sleep(0.05)
    assert r.status_code == 200 and r.json() == {"deleted": "astro"}
    assert httpx.post(live_app.http + "/api/avatar/delete", json={"name": "astro"}).status_code == 404
    assert httpx.post(live_app.http + "/api/avatar/start", json={"name": "astro"}).status_code == 404
    assert httpx.post(live_app.http + "/api/avatar/delete", json={"name": "default"}).status_code == 403
    assert "astro" not in [a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]]


def test_hostile_uploads_are_refused_with_clear_errors(live_app: LiveApp, astronaut_png: bytes) -> None:
    cases = [
        ("bad/name", astronaut_png, 400, "avatar names"),
        ("..", astronaut_png, 400, "avatar names"),
        ("text", b"this is not an image at all" * 10, 415, "not an image or a video"),
        ("truncated", astronaut_png[: len(astronaut_png) // 2], 400, "not a readable image"),
        ("bomb", png_header_only(100_000, 100_000), 413, "too large"),
        ("noface", png(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)), 422, "no face"),
        ("tiny", png(np.zeros((20, 20, 3), np.uint8)), 422, "at least 64"),
    ]
    for name, content, status, words in cases:
        r = upload(live_app, name, content)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json())
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (100, 100)).save(gif, format="GIF")
    r = upload(live_app, "gif", gif.getvalue())
    assert r.status_code == 415 and "PNG, JPEG or WebP" in r.json()["detail"]
    # 100 MB: refused from its Content-Length, before the body is read.
    huge = b"\x00" * (100 * 1024 * 1024)
    r = upload(live_app, "huge", huge)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert httpx.post(live_app.http + "/api/avatar/add", data={"name": "x"}).status_code == 422  # no file
    names = [a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]]
    assert names == ["default"]  # nothing half-made was left behind


def test_store_recovers_from_a_crash_mid_upload(tmp_path: Path, astronaut_png: bytes) -> None:
    store = AvatarStore(tmp_path, max_upload_bytes=10 << 20, max_pixels=40_000_000)
    store.add("kept", astronaut_png)
    store.close()
    # A crash left: a temporary directory from AvatarModel.save, a renamed-in directory with no row yet,
    # and a half-deleted avatar.
    (tmp_path / ".astro-abc123").mkdir()
    (tmp_path / ".astro-abc123" / "portrait.png").write_bytes(b"partial")
    ghost = tmp_path / "ghost"
    ghost.mkdir()
    (ghost / "portrait.png").write_bytes(astronaut_png)
    (tmp_path / ".deleted-old-1").mkdir()
    store = AvatarStore(tmp_path, max_upload_bytes=10 << 20, max_pixels=40_000_000)
    assert [a.name for a in store.list()] == ["default", "kept"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["kept"]
    assert store.load("kept").image.shape == (512, 512, 3)
    with pytest.raises(AvatarStoreError) as e:
        store.add("big", b"x" * (11 << 20))
    assert e.value.status == 413
    store.close()


def test_decode_image_formats() -> None:
    rgb = decode_image(png(np.full((80, 90, 3), 120, np.uint8)), 10_000)
    assert rgb.shape == (80, 90, 3)
    with pytest.raises(AvatarStoreError) as e:
        decode_image(png(np.zeros((200, 200, 3), np.uint8)), 10_000)
    assert e.value.status == 413


def _post_raw(port: int, head: str, body_chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Sends a request over a raw socket, stopping as soon as the server answers; returns (answer, bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    sent = 0
    try:
        s.sendall(head.encode())
        for chunk in body_chunks:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break  # the server answered before the body ended
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while b"\r\n\r\n" not in answer and (part := s.recv(65536)):
                answer += part
        return answer, sent
    finally:
        s.close()


def test_uploads_over_the_limit_are_refused_before_they_are_read(live_app: LiveApp) -> None:
    """By Content-Length at once, and a chunked body is cut off at the limit: the server never takes 300 MB."""
    limit = live_app.settings.avatar.largest_upload  # a portrait or a video clip
    mb = b"\x00" * (1 << 20)
    head = (f"POST /api/avatar/add HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {300 << 20}\r\n\r\n")
    answer, sent = _post_raw(live_app.port, head, iter([mb] * 300))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < limit, sent  # answered from the header, while the body was still coming

    def chunked() -> Iterator[bytes]:
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        for k in range(300):
            data = part + mb if k == 0 else mb  # a well-formed part whose file never ends
            yield b"%x\r\n" % len(data) + data + b"\r\n"

    head = ("POST /api/avatar/add HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    answer, sent = _post_raw(live_app.port, head, chunked())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < limit + (8 << 20), sent  # stopped near the limit (plus what the socket buffers held)
    # Other routes have the general limit.
    r = httpx.post(live_app.http + "/api/llm/chat", content=b"{" + b" " * (live_app.settings.server.max_body_bytes + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert httpx.get(live_app.http + "/health").status_code == 200
