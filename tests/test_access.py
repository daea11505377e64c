"""Access (issue 14): cross-site WebSockets are refused, the write APIs can need a token, and a deployment can
close the open read-only endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from avatarchat.config import load_settings
from avatarchat.server.access import origin_allowed
from tests.support.live_app import LiveApp
from tests.support.openai_server import OpenAITestServer

TOKEN = "t0ken-for-tests"


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "example.com", [], True),  # not a browser
    ("https://example.com", "example.com", [], True),  # same origin
    ("http://localhost:5173", "example.com", [], True),  # a page on this machine (the dev server)
    ("http://127.0.0.1:9", "example.com", [], True),
    ("http://[::1]:9", "example.com", [], True),
    ("https://evil.example", "example.com", [], False),
    ("null", "example.com", [], False),
    ("https://app.example.com", "avatar.example.com", ["https://app.example.com"], True),
    ("http://localhost:5173", "avatar.example.com", ["https://app.example.com"], False),  # a list replaces loopback
    ("https://evil.example", "example.com", ["*"], True),
])
def test_origin_rules(origin: str | None, host: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


async def _session(url: str, origin: str | None) -> dict[str, object]:
    headers = {"Origin": origin} if origin else {}
    async with connect(url, additional_headers=headers, open_timeout=20) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 30))


async def test_a_page_on_another_site_cannot_open_a_session(live_app: LiveApp) -> None:
    with pytest.raises(InvalidStatus) as e:
        await _session(live_app.ws, "https://evil.example")
    assert e.value.response.status_code == 403 and b"allowed_origins" in e.value.response.body
    assert (await _session(live_app.ws, live_app.http))["type"] == "session"  # its own page
    assert (await _session(live_app.ws, None))["type"] == "session"  # a program
    assert httpx.get(live_app.http + "/metrics").status_code == 200  # open by default
    assert httpx.get(live_app.http + "/openapi.json").status_code == 200


@pytest.fixture(scope="module")
def locked_app(openai_server: OpenAITestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    settings = load_settings(
        server={"allowed_origins": ["https://app.example.com"], "api_token": TOKEN,
                "endpoints": {"metrics": "token", "monitor": "off", "docs": "off"}},
        llm={"engine": "openai", "openai": {"base_url": openai_server.base_url, "model": "test-model"}},
        avatar={"dir": str(tmp_path_factory.mktemp("avatars"))},
    )
    app = LiveApp(settings).start()
    yield app
    app.stop()


async def test_a_locked_down_deployment(locked_app: LiveApp) -> None:
    base, auth = locked_app.http, {"Authorization": f"Bearer {TOKEN}"}
    # The listed origin only.
    assert (await _session(locked_app.ws, "https://app.example.com"))["type"] == "session"
    with pytest.raises(InvalidStatus):
        await _session(locked_app.ws, f"http://127.0.0.1:{locked_app.port}9")
    # Writes need the token; reads stay open.
    for path, body in (("/api/avatar/delete", {"name": "x"}), ("/api/avatar/start", {"name": "default"}),
                       ("/api/llm/chat", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(base + path, json=body, timeout=30)
        assert r.status_code == 401 and "api_token" in r.json()["detail"], (path, r.text)
        assert httpx.post(base + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.post(base + "/api/avatar/delete", json={"name": "nobody"}, headers=auth, timeout=30).status_code == 404
    r = httpx.post(base + "/api/avatar/add", files={"file": ("a.png", b"x")}, data={"name": "a"}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(base + "/api/avatar/list").status_code == 200
    assert httpx.get(base + "/health").status_code == 200
    # Read-only endpoints as configured.
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/metrics", headers=auth).status_code == 200
    for path in ("/api/monitor", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(base + path).status_code == 404, path
