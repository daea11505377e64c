"""Two roles on loopback: a gateway forwarding the avatar-service API over pooled HTTP to an avatar service,
WebRTC signalling through the proxy with a real aiortc client, and the proxy's hardening."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from skimage import data

from avatarchat.config import AvatarClientConfig, load_settings
from avatarchat.services.avatar_client import AvatarServiceError, HttpAvatarService
from tests.support.live_app import LiveApp
from tests.support.openai_server import OpenAITestServer
from tests.support.redis_celery import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def avatar_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """The avatar service alone: no LLM, VAD or ASR is loaded."""
    settings = load_settings(services={"role": "avatar", "webrtc_max_peers": 1},
                             avatar={"dir": str(tmp_path_factory.mktemp("av-service"))})
    app = LiveApp(settings).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def gateway(avatar_app: LiveApp, openai_server: OpenAITestServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    settings = load_settings(
        services={"role": "gateway", "avatar": {"url": avatar_app.http, "max_connections": 7,
                                                "max_keepalive_connections": 3}},
        llm={"engine": "openai", "openai": {"base_url": openai_server.base_url}},
        tts={"engine": "espeak"},
        avatar={"dir": str(tmp_path_factory.mktemp("gw-own"))},
    )
    app = LiveApp(settings).start()
    yield app
    app.stop()


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def test_avatar_role_loads_no_llm_or_asr(avatar_app: LiveApp) -> None:
    ready = httpx.get(avatar_app.http + "/ready").json()
    assert ready["ready"] and ready["role"] == "avatar"
    assert set(ready["load_seconds"]) == {"avatar", "warm_up"}
    assert ready["dependencies"]["avatar_service"] == {"where": "in-process", "ok": True, "peers": 0}
    # No sessions and no LLM endpoints on the avatar service.
    assert httpx.post(avatar_app.http + "/api/llm/chat", json={"messages": []}).status_code == 404
    engines = avatar_app.app.state.engines
    assert engines.asr.engine._model is None and engines.llm._model is None


def test_gateway_forwards_every_route_over_http(gateway: LiveApp, avatar_app: LiveApp) -> None:
    g, a = gateway.http, avatar_app.http
    assert httpx.get(g + "/api/avatar/list").json() == httpx.get(a + "/api/avatar/list").json()
    assert httpx.get(g + "/api/tts/models").json() == httpx.get(a + "/api/tts/models").json()
    prev = httpx.get(g + "/api/avatar/preview", params={"name": "default", "size": 64})
    assert prev.status_code == 200 and prev.headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(prev.content, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    assert httpx.post(g + "/api/avatar/start", json={"name": "default"}).json()["ready"] is True
    # Errors keep their status and say where they came from.
    missing = httpx.get(g + "/api/avatar/preview", params={"name": "nobody"})
    assert missing.status_code == 404 and missing.json()["detail"].startswith("avatar service:")
    assert httpx.get(g + "/api/avatar/preview", params={"name": "../etc"}).status_code == 400
    assert httpx.post(g + "/api/avatar/start", json={"name": "nobody"}).status_code == 404


def test_upload_through_the_gateway_is_stored_by_the_avatar_service(gateway: LiveApp, avatar_app: LiveApp) -> None:
    g = gateway.http
    r = httpx.post(g + "/api/avatar/add", data={"name": "astro"},
                   files={"file": ("astronaut.png", png(data.astronaut()))}, timeout=60)
    assert r.status_code == 201, r.text
    assert (Path(avatar_app.settings.avatar.dir) / "astro" / "portrait.png").is_file()
    assert not (Path(gateway.settings.avatar.dir) / "astro").exists()
    assert "astro" in [x["name"] for x in httpx.get(g + "/api/avatar/list").json()["avatars"]]
    dup = httpx.post(g + "/api/avatar/add", data={"name": "astro"}, files={"file": ("a.png", png(data.astronaut()))},
                     timeout=60)
    assert dup.status_code == 409
    bad = httpx.post(g + "/api/avatar/add", data={"name": "junk"}, files={"file": ("a.png", b"not an image")})
    assert bad.status_code == 415 and "avatar service" in bad.json()["detail"]  # neither an image nor a video
    assert httpx.post(g + "/api/avatar/delete", json={"name": "astro"}).json() == {"deleted": "astro"}
    assert not (Path(avatar_app.settings.avatar.dir) / "astro").exists()
    assert httpx.post(g + "/api/avatar/delete", json={"name": "astro"}).status_code == 404


def test_a_domain_403_from_the_avatar_service_stays_a_403(gateway: LiveApp) -> None:
    """Only the avatar service's token check (401, www-authenticate: Bearer) is the gateway's own fault (502);
    a 403 about the request itself reaches the user as it is."""
    r = httpx.post(gateway.http + "/api/avatar/delete", json={"name": "default"})
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == "avatar service: the built-in avatar cannot be deleted"


def test_one_pooled_client_with_the_configured_limits(gateway: LiveApp) -> None:
    service = gateway.app.state.avatar_service
    assert isinstance(service, HttpAvatarService)
    pool = service._client._transport
    assert pool.limits == (7, 3)
    timeout = service._client.timeout
    assert (timeout.connect, timeout.read, timeout.pool) == (3.0, 30.0, 10.0)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.http) as c:
            return [r.status_code for r in await asyncio.gather(*(c.get("/api/avatar/list") for _ in range(30)))]

    assert asyncio.run(burst()) == [200] * 30
    assert gateway.app.state.avatar_service is service  # the same client served every request
    assert 1 <= pool.idle_connections() <= 3  # kept alive for the next request, within the limit


def test_gateway_ready_reports_its_dependencies(gateway: LiveApp) -> None:
    deps = httpx.get(gateway.http + "/ready", timeout=30).json()["dependencies"]
    assert deps["avatar_service"]["ok"] is True and deps["avatar_service"]["where"].startswith("http://127.0.0.1:")
    assert deps["llm"]["engine"] == "openai" and deps["llm"]["exec"]["channel"]["ok"] is True
    assert deps["llm"]["exec"]["mode"] == "asyncio"
    assert deps["redis"]["ok"] is False and deps["redis"]["required"] is False  # none configured here


async def test_unreachable_avatar_service_is_a_502_and_the_client_closes() -> None:
    service = HttpAvatarService(AvatarClientConfig(url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1))
    with pytest.raises(AvatarServiceError, match="unreachable") as e:
        await service.list()
    assert e.value.status == 502
    health = await service.health()
    assert health["ok"] is False and "error" in health
    await service.close()
    assert service.closed


def raw_request(port: int, method: str, target: str, body: bytes = b"", host: str = "127.0.0.1") -> tuple[int, str]:
    """Send the request line exactly as written: HTTP clients would normalise these paths away."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        s.sendall(head.encode() + body)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode("latin-1")
    status = int(text.split(" ", 2)[1])
    return status, text.split("\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "method, target, status",
    [
        ("POST", "/api/webrtc/../avatar/delete", 400),
        ("POST", "/api/webrtc/%2e%2e/avatar/delete", 400),
        ("POST", "/api/webrtc/%2E%2E/%2E%2E/admin/reload", 400),
        ("POST", "/api/webrtc/offer%2F..%2F..%2Fadmin", 400),
        ("DELETE", "/api/webrtc/peers/..", 400),
        ("DELETE", "/api/webrtc/peers/%2e%2e%2fx", 400),
        ("POST", "/api/webrtc/http://evil.example/offer", 400),
        ("POST", "/api/webrtc//evil.example/offer", 400),
        ("POST", "/api/webrtc/offer\\..\\x", 400),
        ("POST", "/api/webrtc/admin", 404),
        ("POST", "/api/webrtc/peers", 404),
        ("GET", "/api/webrtc/offer", 405),
        ("POST", "/api/webrtc/peers/abc", 405),
    ],
)
def test_proxy_refuses_traversal_unknown_routes_and_urls(gateway: LiveApp, method: str, target: str,
                                                         status: int) -> None:
    got, body = raw_request(gateway.port, method, target, b"{}")
    assert got == status, body
    assert not json.loads(body)["detail"].startswith("avatar service")  # refused here, never forwarded


def test_proxy_cannot_be_pointed_at_another_host(gateway: LiveApp) -> None:
    # An absolute-form target and a foreign Host header still reach only the configured avatar service.
    status, body = raw_request(gateway.port, "POST", "http://evil.example/api/webrtc/offer", b"{}", host="evil.example")
    assert status == 400 and "body must be" in json.loads(body)["detail"]
    status, body = raw_request(gateway.port, "POST", "/api/webrtc/offer", b'{"type": "offer", "sdp": "x"}',
                               host="evil.example")
    assert status == 400 and json.loads(body)["detail"].startswith("avatar service: bad SDP offer")
    assert raw_request(gateway.port, "POST", "/api/webrtc/offer", b"not json")[0] == 400


async def test_webrtc_video_through_the_gateway(gateway: LiveApp, avatar_app: LiveApp) -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    got_track: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got_track.done() or got_track.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as c:
        r = await c.post("/api/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp, "avatar": "default"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer" and "m=video" in answer["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        track = await asyncio.wait_for(got_track, 20)
        frames = [await asyncio.wait_for(track.recv(), 20) for _ in range(5)]  # type: ignore[attr-defined]
        assert all(f.width == 512 and f.height == 512 for f in frames)
        pixels = frames[-1].to_ndarray(format="rgb24")
        assert pixels.std() > 10  # a picture of the avatar, not a blank frame
        assert len(avatar_app.app.state.avatar_service.peers) == 1
        full = await c.post("/api/webrtc/offer", json={"type": "offer", "sdp": "v=0"})
        assert full.status_code == 503 and "at most 1 peers" in full.json()["detail"]
        closed = await c.delete(f"/api/webrtc/peers/{answer['peer']}")
        assert closed.status_code == 200 and closed.json() == {"closed": answer["peer"]}
        assert (await c.delete(f"/api/webrtc/peers/{answer['peer']}")).status_code == 404
        assert len(avatar_app.app.state.avatar_service.peers) == 0
        unknown = await c.post("/api/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp,
                                                          "avatar": "nobody"})
        assert unknown.status_code == 404
    await pc.close()


def test_cli_serve_role_avatar(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from tests.support.redis_celery import ROOT

    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", AVATARCHAT_AVATAR__DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "avatarchat", "serve", "--role", "avatar", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
                time.sleep(0.1)
        assert health["role"] == "avatar" and "llm_exec" not in health
    finally:
        proc.terminate()
        assert proc.wait(20) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    bad = subprocess.run([sys.executable, "-m", "avatarchat", "serve", "--role", "bogus"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize("chunk", ["5", "[1, 2]", '{"choices": [5]}', '{"choices": [{"delta": "x"}]}'])
async def test_an_llm_chunk_of_another_shape_ends_the_turn_with_an_error(gateway: LiveApp, upstream: OpenAITestServer,
                                                                         chunk: str) -> None:
    """Well-formed JSON of the wrong shape from the LLM: the turn ends with `error` and `turn_done`, and the
    session takes the next message as usual."""
    from tests.support.openai_server import Behaviour
    from tests.test_server import open_client

    upstream.behaviour = Behaviour(raw_data=['{"choices": [{"delta": {"content": "Hello "}}]}', chunk])
    c = await open_client(gateway)
    try:
        await c.send(type="user_text", text="Hi?")
        done, events = await c.until("turn_done", timeout=60)
        errors = [e for e in events if e["type"] == "error"]
        assert done["reason"] == "error" and [e["code"] for e in errors] == ["llm_failed"], events
        assert "chat-completion delta" in errors[0]["message"] and errors[0]["turn_id"] == done["turn_id"]
        upstream.behaviour = Behaviour()
        await c.send(type="user_text", text="Hi again?")
        done, _ = await c.until("turn_done", timeout=60)
        assert done["reason"] == "complete" and done["text"] == Behaviour().reply
    finally:
        await c.ws.close()
