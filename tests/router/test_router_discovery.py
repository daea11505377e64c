"""Model discovery when providers are slow or down: 503 + Retry-After (not 404) while a model may still
appear, background retries with backoff, /admin/reload re-running discovery, its own timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from avatarchat.router import discovery
from avatarchat.router.config import load_config
from avatarchat.router.service import Router
from tests.router.conftest import base_config, write
from tests.support.openai_server import OpenAITestServer


def wild_config(ups: list[OpenAITestServer], **discovery_conf: Any) -> dict[str, Any]:
    """Provider a is discovered (GET /models) into channel "wild"; a request waits at most 0.2 s for the index."""
    cfg = base_config(ups, discovery_cache="models.json", limits={"index_wait_s": 0.2},
                      discovery={"timeout_s": 5, **discovery_conf})
    cfg["providers"]["a"]["discovery"] = True
    cfg["channels"].append({"name": "wild", "provider": "a", "models": ["*"], "tags": ["disc"]})
    return cfg


def assert_pending(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "discovery_pending"
    assert "wild" in err["message"]


async def eventually_served(live, model: str, timeout: float = 15) -> httpx.Response:
    """Poll until the model is served; every answer before that must be 503 (never 404)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await live.chat(model)
        if r.status_code == 200:
            return r
        assert_pending(r)
        assert time.monotonic() < deadline, f"{model} was never served"
        await asyncio.sleep(0.05)


async def test_model_of_a_discovery_in_progress_is_503_then_served(live_router, ups: list[OpenAITestServer]) -> None:
    gate = threading.Event()
    ups[0].behaviour.models, ups[0].behaviour.models_gate = ["late/model-7b"], gate
    try:
        live = await live_router(wild_config(ups))
        assert (await live.chat("gpt-4o")).status_code == 200  # the YAML's own models are served meanwhile
        assert_pending(await live.chat("late/model-7b"))
        assert_pending(await live.chat("tag:disc"))
    finally:
        gate.set()
    r = await eventually_served(live, "late/model-7b")
    assert r.headers["x-router-channel"] == "wild"
    await asyncio.wait_for(live.router.state.index.complete.wait(), 10)
    r = await live.chat("late/not-there-7b")  # discovery is done: an unknown model really is unknown
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_failed_discovery_is_retried_in_the_background(live_router, ups: list[OpenAITestServer]) -> None:
    ups[0].behaviour.models, ups[0].behaviour.models_status = ["late/model-7b"], 503
    live = await live_router(wild_config(ups, retry_base_s=0.05, retry_max_s=0.2, retry_attempts=1000))
    deadline = time.monotonic() + 15
    while ups[0].models_requests < 3:  # the first try and two retries
        assert time.monotonic() < deadline, "discovery was not retried"
        await asyncio.sleep(0.02)
    assert_pending(await live.chat("late/model-7b"))
    stats = (await live.client.get("/admin/stats", headers=live.admin)).json()["discovery"]
    assert stats["pending"] == ["a"] and "503" in stats["errors"]["a"] and stats["retry_in_s"] is not None
    assert discovery.read_snapshot(live.path.parent / "models.json") is None  # a partial result is not cached
    ups[0].behaviour.models_status = 200  # the provider is back
    r = await eventually_served(live, "late/model-7b")
    assert r.headers["x-router-channel"] == "wild"
    assert (await live.chat("late/not-there-7b")).status_code == 404
    stats = (await live.client.get("/admin/stats", headers=live.admin)).json()["discovery"]
    assert stats == {"pending": [], "errors": {}, "retry_in_s": None}
    assert discovery.read_snapshot(live.path.parent / "models.json") == [("a", "late/model-7b", None, None, None)]


async def test_discovery_gives_up_after_its_retries_then_reload_runs_it_again(live_router, ups: list[OpenAITestServer]) -> None:
    ups[0].behaviour.models, ups[0].behaviour.models_status = ["late/model-7b"], 503
    live = await live_router(wild_config(ups, retry_base_s=0.01, retry_max_s=0.01, retry_attempts=2))
    task = live.router._discovery
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 15)  # the retry loop ends: it gave up
    assert ups[0].models_requests == 3 and not live.router.state.pending  # the first try and two retries
    r = await live.chat("late/model-7b")  # no longer expected to appear: 404, saying why
    assert r.status_code == 404 and "discovery failed" in r.json()["error"]["message"]
    ups[0].behaviour.models_status = 200
    r = await live.client.post("/admin/reload", headers=live.admin)  # the same file: discovery runs again
    assert r.status_code == 200 and r.json()["discovery_errors"] == {}
    r = await live.chat("late/model-7b")
    assert r.status_code == 200 and r.headers["x-router-channel"] == "wild"
    assert ups[0].models_requests == 4


async def test_reload_keeps_retrying_while_the_provider_is_down(live_router, ups: list[OpenAITestServer]) -> None:
    ups[0].behaviour.models, ups[0].behaviour.models_status = ["late/model-7b"], 503
    live = await live_router(wild_config(ups, retry_attempts=0))
    await asyncio.wait_for(live.router.state.index.complete.wait(), 10)
    r = await live.client.post("/admin/reload", headers=live.admin)
    assert r.status_code == 200 and "503" in r.json()["discovery_errors"]["a"]
    cfg = wild_config(ups, retry_base_s=0.05, retry_max_s=0.05, retry_attempts=1000)
    write(live.path, cfg)
    r = await live.client.post("/admin/reload", headers=live.admin)  # now with retries
    assert r.status_code == 200
    assert_pending(await live.chat("late/model-7b"))
    ups[0].behaviour.models_status = 200
    await eventually_served(live, "late/model-7b")


async def _discover_once(tmp_path: Path, ups: list[OpenAITestServer], cfg: dict[str, Any]) -> Router:
    router = Router(load_config(write(tmp_path / "r.yaml", cfg)), tmp_path / "r.yaml")
    await router.start()
    await asyncio.wait_for(router.state.index.complete.wait(), 20)
    return router


async def test_discovery_has_its_own_timeout(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    ups[0].behaviour.models, ups[0].behaviour.models_delay_s = ["slow/model-7b"], 0.5
    cfg = wild_config(ups, timeout_s=0.1, retry_attempts=0)
    cfg["health"]["timeout_s"] = 10  # no longer borrowed by discovery
    router = await _discover_once(tmp_path, ups, cfg)
    try:
        assert not router.state.index.models("slow/model-7b")
        assert "timed out" in router.stats()["discovery"]["errors"]["a"]  # type: ignore[index]
    finally:
        await router.close()
    cfg = wild_config(ups, timeout_s=10, retry_attempts=0)
    cfg["health"]["timeout_s"] = 0.1
    router = await _discover_once(tmp_path, ups, cfg)
    try:
        assert [e.channel for e in router.state.index.models("slow/model-7b")] == ["wild"]
    finally:
        await router.close()
