"""A gateway whose sessions are rendered by a separate avatar-service process, over the render API.

The avatar service is a real `avatarchat serve --role avatar` subprocess (its own metrics, and it can be
killed); the gateway is the real app in a thread with the OpenAI-compatible test server and espeak.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from avatarchat import metrics
from avatarchat.config import AvatarClientConfig, load_settings
from avatarchat.services.avatar_client import AvatarServiceError, HttpAvatarService
from avatarchat.services.render_client import RemoteAvatarMedia
from avatarchat.services.render_wire import DUE_MS, FIRST_FRAME, FRAMES, SAMPLES, pack_batch
from tests.support.live_app import LiveApp
from tests.support.openai_server import OpenAITestServer
from tests.support.redis_celery import ROOT, free_port, stop_process
from tests.test_server import Client, decode_media, open_client
from tests.test_services import png, raw_request

pytestmark = pytest.mark.timeout(120)

MAX_STREAMS = 3
IDLE_EXPIRY_S = 4.0
TOKEN = "gateway-secret-42"  # services.token: the avatar process answers /api/* only with it
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_REPLY = " ".join(f"Sentence number {i} goes on for a while, so the turn is long." for i in range(30))


class AvatarProcess:
    """`avatarchat serve --role avatar` on a fixed port, so it can be killed and started again."""

    def __init__(self, avatar_dir: Path) -> None:
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.env = dict(
            os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}", AVATARCHAT_AVATAR__DIR=str(avatar_dir),
            AVATARCHAT_SERVICES__RENDER__MAX_STREAMS=str(MAX_STREAMS),
            AVATARCHAT_SERVICES__RENDER__IDLE_EXPIRY_S=str(IDLE_EXPIRY_S),
            AVATARCHAT_SERVICES__RENDER__MAX_BATCH_FRAMES="50",
            AVATARCHAT_SERVICES__RENDER__MAX_BATCH_SAMPLES="100000",
            AVATARCHAT_SERVICES__TOKEN=TOKEN,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AvatarProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "avatarchat", "serve", "--role", "avatar", "--port", str(self.port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.http + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "the avatar service did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, 20)

    def status(self) -> dict[str, int]:
        return render_status(self.http, AUTH)

    def frames_metric(self) -> float:
        text = httpx.get(self.http + "/metrics", timeout=5).text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith("avatarchat_frames_total ")))

    def wait_streams(self, n: int, timeout: float = 8) -> dict[str, int]:
        return wait_streams(self.http, n, timeout, AUTH)


def render_status(base: str, headers: dict[str, str] | None = None) -> dict[str, int]:
    return httpx.get(base + "/api/render/status", timeout=5, headers=headers).json()  # type: ignore[no-any-return]


def wait_streams(base: str, n: int, timeout: float = 8, headers: dict[str, str] | None = None) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (status := render_status(base, headers))["streams"] != n:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


@pytest.fixture(scope="module")
def avatar_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AvatarProcess]:
    service = AvatarProcess(tmp_path_factory.mktemp("render-avatars")).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def render_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """An avatar service in this process, with small limits, for the render API's hardening."""
    settings = load_settings(
        services={"role": "avatar", "render": {"max_streams": MAX_STREAMS, "idle_expiry_s": 1.0,
                                               "max_batch_frames": 50, "max_batch_samples": 100000}},
        avatar={"dir": str(tmp_path_factory.mktemp("render-app"))})
    app = LiveApp(settings).start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def gateway(avatar_service: AvatarProcess, openai_server: OpenAITestServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    settings = load_settings(
        services={"role": "gateway", "avatar": {"url": avatar_service.http}, "render": {"timeout_s": 5}, "token": TOKEN},
        llm={"engine": "openai", "openai": {"base_url": openai_server.base_url}},
        tts={"engine": "espeak"},
        avatar={"dir": str(tmp_path_factory.mktemp("gw-avatars"))},
    )
    app = LiveApp(settings).start()
    yield app
    app.stop()


async def turn(c: Client, text: str = "Hello there") -> tuple[dict, list[dict]]:
    await c.send(type="user_text", text=text)
    return await c.until("turn_done", timeout=60)


def test_the_gateway_loads_no_renderer(gateway: LiveApp) -> None:
    ready = httpx.get(gateway.http + "/ready", timeout=10).json()
    assert ready["ready"] and ready["role"] == "gateway"
    assert "avatar" not in ready["load_seconds"]  # its warm-up is the capacity calibration alone: TTS and LLM
    assert isinstance(gateway.app.state.media, RemoteAvatarMedia)
    assert not hasattr(gateway.app.state, "render")


def test_the_render_api_is_only_on_the_avatar_service(live_app: LiveApp) -> None:
    """It is internal, for gateways: an ``all`` process (which faces users) does not offer it."""
    assert httpx.get(live_app.http + "/api/render/status").status_code == 404
    assert httpx.post(live_app.http + "/api/render/open", json={"avatar": "default"}).status_code == 404
    assert not hasattr(live_app.app.state, "render")


async def test_a_gateway_turn_is_rendered_by_the_avatar_service(gateway: LiveApp, avatar_service: AvatarProcess,
                                                                 upstream: OpenAITestServer) -> None:
    before, here_before = avatar_service.status()["frames"], metrics.FRAMES._value.get()
    metric_before = avatar_service.frames_metric()
    from websockets.asyncio.client import connect

    async with connect(gateway.ws) as ws:  # the session's media size comes from the avatar service
        hello = json.loads(await ws.recv())
        assert hello["type"] == "session" and (hello["media"]["width"], hello["media"]["height"]) == (512, 512)
    c = await open_client(gateway)
    done, events = await turn(c)
    assert done["reason"] == "complete", events
    media = bytes(c.media[done["turn_id"]])
    assert media[4:8] == b"ftyp"
    frames, video_s, audio_s, codec = decode_media(media)
    assert codec == "h264" and frames > 10 and abs(video_s - audio_s) <= 0.040
    assert abs(done["media_ms"] / 1000 - video_s) <= 0.041  # the tail's repeated frames came back in x-render-frames
    start = next(e for e in events if e["type"] == "media_start")
    assert "avc1.42" in start["mime"] and "mp4a.40.2" in start["mime"]
    assert {"first_text", "first_audio", "first_video"} <= set(done["timings"])
    # Rendered over there, not here: the avatar process counted every frame, this process none.
    status = avatar_service.wait_streams(0)
    assert status["frames"] - before == frames - (done["media_ms"] // 40 - sum(
        e["duration_ms"] for e in events if e["type"] == "sentence") // 40)
    assert avatar_service.frames_metric() - metric_before == status["frames"] - before
    assert metrics.FRAMES._value.get() == here_before
    assert gateway.app.state.engines.avatars._renderers == {}
    # The session goes on: a second turn continues the frame count.
    done2, _ = await turn(c, "And again")
    assert done2["reason"] == "complete" and c.media[done2["turn_id"]][4:8] == b"ftyp"
    await c.ws.close()


def test_idle_clip_through_the_gateway(gateway: LiveApp, avatar_service: AvatarProcess) -> None:
    clip = httpx.get(gateway.http + "/avatars/default/idle.mp4", timeout=60)
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    assert clip.content == httpx.get(avatar_service.http + "/api/render/idle", params={"avatar": "default"},
                                             headers=AUTH).content
    frames, video_s, _, codec = decode_media(clip.content)
    assert codec == "h264" and frames >= 25
    assert "default" in gateway.app.state.media._idle  # cached per avatar, like IdleClips
    assert httpx.get(gateway.http + "/avatars/default/idle.mp4").content == clip.content
    assert httpx.get(gateway.http + "/avatars/nobody/idle.mp4").status_code == 404
    assert httpx.get(gateway.http + "/avatars").json()["avatars"] == ["default"]


async def test_new_avatar_update_and_delete_in_use(gateway: LiveApp, avatar_service: AvatarProcess) -> None:
    from skimage import data

    g = gateway.http
    assert httpx.get(g + "/avatars").json()["avatars"] == ["default"]  # the list is now cached on the gateway
    r = httpx.post(g + "/api/avatar/add", data={"name": "astro"},
                   files={"file": ("astronaut.png", png(data.astronaut()))}, timeout=60)
    assert r.status_code == 201, r.text
    try:
        # Usable at once, though the gateway's list of names was fetched before it existed.
        c = await open_client(gateway, "?avatar=astro")
        await c.send(type="session.update", avatar="default")
        updated = await c.event()
        assert updated["type"] == "session.updated" and updated["settings"]["avatar"] == "default"
        assert "astro" in updated["settings"]["options"]["avatars"]
        await c.send(type="session.update", avatar="astro")
        assert (await c.event())["settings"]["avatar"] == "astro"
        await c.send(type="session.update", avatar="ghost")
        err = await c.event()
        assert err["type"] == "error" and err["code"] == "invalid_field" and "ghost" in err["message"]
        assert httpx.post(g + "/api/avatar/delete", json={"name": "astro"}).status_code == 409
        await c.ws.close()
        deadline = time.monotonic() + 5
        while len(gateway.app.state.sessions):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        assert httpx.post(g + "/api/avatar/delete", json={"name": "astro"}).json() == {"deleted": "astro"}
    # Deleted: the gateway forgot it, and a session can no longer pick it.
    assert "astro" not in gateway.app.state.media._sizes
    c = await open_client(gateway)
    await c.send(type="session.update", avatar="astro")
    assert (await c.event())["code"] == "invalid_field"
    await c.ws.close()


def test_render_routes_are_not_public_on_the_gateway(gateway: LiveApp) -> None:
    g = gateway.http
    assert httpx.post(g + "/api/render/open", json={"avatar": "default", "audio_rate": 22050}).status_code == 404
    assert httpx.get(g + "/api/render/status").status_code == 404
    assert httpx.get(g + "/api/render/idle", params={"avatar": "default"}).status_code == 404
    # The WebRTC allow-list does not pass them either, however the path is spelled.
    assert raw_request(gateway.port, "POST", "/api/webrtc/render/open", b"{}")[0] == 404
    assert raw_request(gateway.port, "POST", "/api/webrtc/../render/open", b"{}")[0] == 400
    assert raw_request(gateway.port, "POST", "/api/webrtc/%2e%2e/render/open", b"{}")[0] == 400
    assert raw_request(gateway.port, "DELETE", "/api/webrtc/peers/..%2Frender%2Fx", b"")[0] == 400


async def test_the_avatar_service_answers_its_gateways_only(gateway: LiveApp, avatar_service: AvatarProcess) -> None:
    """services.token: /api/* needs the gateway's bearer token; probes stay open; a wrong token is the gateway's
    fault (502, and its /ready says so), never passed on to users as their own 401."""
    a = avatar_service.http
    for path in ("/api/avatar/list", "/api/render/status", "/api/tts/models"):
        r = httpx.get(a + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "services.token" in r.json()["detail"]
        assert httpx.get(a + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(a + path, headers=AUTH).status_code == 200
    assert httpx.post(a + "/api/render/open", json={"avatar": "default", "audio_rate": 22050}).status_code == 401
    assert httpx.get(a + "/health").status_code == 200 and httpx.get(a + "/metrics").status_code == 200
    # The gateway sends it on every path: relayed GETs, forwarded calls, its readiness probe.
    g = gateway.http
    assert httpx.get(g + "/api/avatar/list").status_code == 200
    assert httpx.post(g + "/api/avatar/start", json={"name": "default"}).status_code == 200
    assert httpx.get(g + "/ready", timeout=10).json()["dependencies"]["avatar_service"]["ok"] is True
    wrong = HttpAvatarService(AvatarClientConfig(url=a), token="wrong")
    with pytest.raises(AvatarServiceError, match="refused this gateway") as e:
        await wrong.relay("/api/avatar/list")
    assert e.value.status == 502
    with pytest.raises(AvatarServiceError, match="refused this gateway"):
        await wrong.start("default")
    health = await wrong.health()
    assert health["ok"] is False and "services.token refused" in health["error"]
    await wrong.close()


async def test_stop_during_a_remote_turn_frees_the_stream(gateway: LiveApp, avatar_service: AvatarProcess,
                                                          upstream: OpenAITestServer) -> None:
    upstream.behaviour.reply = LONG_REPLY
    upstream.behaviour.token_delay_s = 0.01
    c = await open_client(gateway)
    await c.send(type="user_text", text="Talk for a while")
    _, seen = await c.until("media_start", timeout=30)
    assert avatar_service.status()["streams"] == 1
    started = time.perf_counter()
    await c.send(type="stop")
    done, _ = await c.until("turn_done", timeout=10)
    assert done["reason"] == "stopped" and time.perf_counter() - started < 2.0
    avatar_service.wait_streams(0)  # the DELETE went out in the background
    upstream.behaviour.reply = "Short again."
    done, _ = await turn(c)
    assert done["reason"] == "complete"
    await c.ws.close()


# -- the render API's hardening, called directly ---------------------------------------------------


def open_stream(base: str, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    return httpx.post(base + "/api/render/open", json={"avatar": "default", "audio_rate": 22050, **body},
                      timeout=30, headers=headers)


def test_render_api_refuses_bad_requests(render_app: LiveApp) -> None:
    a = render_app.http
    assert open_stream(a, avatar="nobody").status_code == 404
    assert open_stream(a, avatar="../etc").status_code == 404
    assert open_stream(a, audio_rate=12345).status_code == 400
    fps = open_stream(a, fps=30)
    assert fps.status_code == 400 and "25 fps" in fps.json()["detail"]
    assert httpx.post(a + "/api/render/open", json={"avatar": ""}).status_code == 422
    opened = open_stream(a)
    assert opened.status_code == 201, opened.text
    info = opened.json()
    assert (info["width"], info["height"], info["fps"]) == (512, 512, 25) and "avc1" in info["mime"]
    sid = info["id"]
    mouth = np.full((4, 3), 0.3, np.float32)
    headers, body = pack_batch(mouth, 0, np.zeros(3528, np.float32))

    def post(path: str, content: bytes, hdrs: dict[str, str]) -> httpx.Response:
        return httpx.post(a + path, content=content, headers=hdrs, timeout=30)

    assert post("/api/render/unknown-id/batch", body, headers).status_code == 404
    assert post("/api/render/bad%20id/batch", body, headers).status_code == 404
    assert post(f"/api/render/{sid}/batch", body[:-4], headers).status_code == 400  # length does not match shapes
    for name, value, status in [(FRAMES, "x", 400), (FRAMES, "0", 400), (FRAMES, "-1", 400), (SAMPLES, "1e9", 400),
                                (FRAMES, "51", 413), (SAMPLES, "100001", 413), (FIRST_FRAME, "99999999999999", 400),
                                (DUE_MS, "soon", 400), (DUE_MS, "-5", 400), (DUE_MS, "3600001", 413)]:
        r = post(f"/api/render/{sid}/batch", body, {**headers, name: value})
        assert r.status_code == status, (name, value, r.text)
        assert r.json()["detail"]
    r = post(f"/api/render/{sid}/batch", b"\0" * 1_000_000, {**headers, FRAMES: "50", SAMPLES: "100000"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    bad = mouth.copy()
    bad[1, 1] = np.nan
    nan_headers, nan_body = pack_batch(bad, 0, None)
    assert post(f"/api/render/{sid}/batch", nan_body, nan_headers).status_code == 400
    # The stream is unharmed by all that: a good batch renders (with or without a deadline), close returns
    # the tail and frees it.
    ok = post(f"/api/render/{sid}/batch", body, headers)
    assert ok.status_code == 200 and ok.headers[FRAMES] == "4" and ok.content
    due = post(f"/api/render/{sid}/batch", body, {**headers, DUE_MS: "250"})
    assert due.status_code == 200 and due.headers[FRAMES] == "8"
    tail = httpx.post(a + f"/api/render/{sid}/close", timeout=30)
    assert tail.status_code == 200 and int(tail.headers[FRAMES]) >= 4
    assert httpx.post(a + f"/api/render/{sid}/close").status_code == 404
    assert httpx.delete(a + f"/api/render/{sid}").status_code == 404
    assert render_status(a)["streams"] == 0
    assert httpx.delete(a + "/api/render/not-a-stream").status_code == 404
    idle = httpx.get(a + "/api/render/idle", params={"avatar": "nobody"})
    assert idle.status_code == 404 and "nobody" in idle.json()["detail"]
    assert httpx.get(a + "/api/render/idle").status_code == 422  # no avatar named
    assert httpx.get(a + "/api/render/idle", params={"avatar": "x" * 65}).status_code == 422
    assert httpx.post(a + "/api/render/" + "a" * 41 + "/close").status_code == 404  # not an id: never looked up
    assert httpx.post(a + "/api/render/open", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 422


def test_render_stream_limit_and_idle_expiry(render_app: LiveApp) -> None:
    a = render_app.http
    ids = [open_stream(a).json()["id"] for _ in range(MAX_STREAMS)]
    full = open_stream(a)
    assert full.status_code == 503 and f"limit of {MAX_STREAMS} streams" in full.json()["detail"]
    assert httpx.delete(a + f"/api/render/{ids.pop()}").json()["aborted"]
    assert open_stream(a).status_code == 201  # a freed slot is usable at once
    # A stream in use is kept past the expiry; the others, unused, are dropped and their ids are gone.
    headers, body = pack_batch(np.zeros((1, 3), np.float32), 0, None)
    for _ in range(6):
        assert httpx.post(a + f"/api/render/{ids[0]}/batch", content=body, headers=headers).status_code == 200
        time.sleep(0.25)
    assert render_status(a)["streams"] == 1
    status = wait_streams(a, 0, timeout=4)
    assert status["expired"] == MAX_STREAMS
    gone = httpx.post(a + f"/api/render/{ids[0]}/batch", content=body, headers=headers)
    assert gone.status_code == 404 and "expired" in gone.json()["detail"]


async def test_a_full_avatar_service_fails_the_turn_not_the_session(gateway: LiveApp, avatar_service: AvatarProcess,
                                                                    upstream: OpenAITestServer) -> None:
    ids = [open_stream(avatar_service.http, headers=AUTH).json()["id"] for _ in range(MAX_STREAMS)]
    c = await open_client(gateway)
    try:
        await c.send(type="user_text", text="Hello")
        err, _ = await c.until("error", timeout=20)
        assert err["code"] == "render_busy" and f"limit of {MAX_STREAMS}" in err["message"] and not err["fatal"]
        assert (await c.until("turn_done", timeout=10))[0]["reason"] == "error"
    finally:
        for sid in ids:
            httpx.delete(avatar_service.http + f"/api/render/{sid}", headers=AUTH)
    done, _ = await turn(c)
    assert done["reason"] == "complete"
    await c.ws.close()


# -- the avatar service goes away (last: it kills the module's service, then starts it again) -----


async def test_avatar_service_killed_mid_turn_then_down_then_back(gateway: LiveApp, avatar_service: AvatarProcess,
                                                                  upstream: OpenAITestServer) -> None:
    upstream.behaviour.reply = LONG_REPLY
    upstream.behaviour.token_delay_s = 0.01
    c = await open_client(gateway)
    await c.send(type="user_text", text="Talk for a while")
    await c.until("media_start", timeout=30)
    avatar_service.kill()
    started = time.perf_counter()
    err, _ = await c.until("error", timeout=10)
    assert err["code"] == "avatar_service_unavailable" and not err["fatal"] and err["turn_id"] == 1, err
    done, _ = await c.until("turn_done", timeout=10)
    assert done["reason"] == "error" and time.perf_counter() - started < 6
    # Down before a turn: the same error for that turn, at once; the session stays up.
    upstream.behaviour.reply = "Short again."
    await c.send(type="ping", id=1)
    assert (await c.until("pong"))[0]["id"] == 1
    await c.send(type="user_text", text="Are you there?")
    err, _ = await c.until("error", timeout=10)
    assert err["code"] == "avatar_service_unavailable" and err["turn_id"] == 2
    assert (await c.until("turn_done", timeout=10))[0]["reason"] == "error"
    # A new session still opens (the avatar and its size are known), and the readiness says what is down.
    other = await open_client(gateway)
    deps = httpx.get(gateway.http + "/ready", timeout=10).json()["dependencies"]
    assert deps["avatar_service"]["ok"] is False
    # Back: the same session's next turn is rendered again.
    avatar_service.start()
    done, _ = await turn(c, "Back?")
    assert done["reason"] == "complete" and c.media[done["turn_id"]][4:8] == b"ftyp"
    await c.ws.close()
    await other.ws.close()


def test_batch_header_round_trip() -> None:
    mouth = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    headers, body = pack_batch(mouth, 7, np.ones(5, np.float32))
    assert headers[FRAMES] == "2" and headers[FIRST_FRAME] == "7" and headers[SAMPLES] == "5"
    from avatarchat.services.render_wire import unpack_batch

    got_mouth, got_audio = unpack_batch(body, 2, 5)
    assert np.array_equal(got_mouth, mouth) and got_audio is not None and np.array_equal(got_audio, np.ones(5))
    assert unpack_batch(pack_batch(mouth, 0, None)[1], 2, 0)[1] is None
    json.dumps(headers)  # plain strings: they travel as HTTP headers


async def test_a_stalled_avatar_service_times_out_instead_of_hanging() -> None:
    """Accepts connections, never answers (a frozen process): each render call ends after timeout_s."""
    import socket

    from avatarchat.config import RenderServiceConfig
    from avatarchat.pipeline.avatar_media import MediaError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes the handshakes; nobody reads
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    media = RemoteAvatarMedia(client, RenderServiceConfig(timeout_s=0.3), 25)
    try:
        for call in (media.open("default", 22050), media.size("default"), media.idle_clip("default"),
                     media.list_names()):
            started = time.perf_counter()
            with pytest.raises(MediaError) as e:
                await call
            assert e.value.code == "avatar_service_unavailable" and "timed out" in str(e.value)
            assert time.perf_counter() - started < 2
        assert "default" not in media._idle  # a failure is not cached
    finally:
        await client.aclose()
        listener.close()
