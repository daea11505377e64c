"""The router as the avatar's LLM engine (in-process), its local channel, and the /v1 mount in the app."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from avatarchat.config import ConfigError, OpenAIConfig, load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.engines.llm.openai_compat import OpenAIEngine
from avatarchat.engines.llm.router import RouterEngine
from avatarchat.engines.registry import LLM_ENGINES
from avatarchat.router import discovery
from avatarchat.router.config import load_config
from avatarchat.router.service import Router
from tests.router.conftest import base_config, write
from tests.support.openai_server import OpenAITestServer

MSGS = [{"role": "user", "content": "hi"}]


def local_config(ups: list[OpenAITestServer]) -> dict:
    cfg = base_config(ups)
    cfg["providers"]["embedded"] = {"type": "local"}
    cfg["channels"].append({"name": "embedded", "provider": "embedded", "models": ["smollm2-135m"]})
    return cfg


async def test_engine_routes_in_process_with_a_local_channel(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    path = write(tmp_path / "r.yaml", local_config(ups))
    settings = load_settings(llm={"engine": "router", "router": {"config": str(path), "model": "tag:local"}})
    # Any LLMEngine can be the in-process local channel; here one that talks to upstream c.
    local = OpenAIEngine(OpenAIConfig(base_url=ups[2].base_url, model="local-test"))
    engine = RouterEngine(settings, local=local)
    await engine.start()
    try:
        text = "".join([d async for d in engine.stream(MSGS, max_tokens=20, temperature=0.1)])
        assert text == "answer from c ."
        assert ups[2].requests[-1]["body"]["model"] == "local-test"
        assert not ups[0].requests and not ups[1].requests
        assert engine.count_tokens("hello there") >= 1
        ups[2].behaviour.status = 500  # the local channel fails: the router fails over to a remote one
        settings2 = load_settings(llm={"engine": "router", "router": {"config": str(path), "model": "shared-model", "strategy": "local_first"}})
        engine2 = RouterEngine(settings2, local=local)
        await engine2.start()
        try:
            text = "".join([d async for d in engine2.stream(MSGS, max_tokens=20, temperature=0.1)])
            assert text in ("answer from a .", "answer from b .", "answer from c .")
        finally:
            engine2.router and await engine2.router.close()
    finally:
        await engine.close()


async def test_engine_errors_are_llm_errors(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    path = write(tmp_path / "r.yaml", base_config(ups))
    engine = LLM_ENGINES["router"](load_settings(llm={"engine": "router", "router": {"config": str(path), "model": "nope"}}))
    await engine.start()
    try:
        with pytest.raises(LLMError, match="no channel serves model 'nope'"):
            [d async for d in engine.stream(MSGS, max_tokens=5, temperature=0)]
    finally:
        await engine.close()
    ups[0].behaviour.drop_after_tokens = 1
    engine = RouterEngine(load_settings(llm={"engine": "router", "router": {"config": str(path), "model": "tag:fast"}}))
    await engine.start()
    try:
        with pytest.raises(LLMError, match="mid-stream"):
            [d async for d in engine.stream(MSGS, max_tokens=5, temperature=0)]
    finally:
        await engine.close()
    (tmp_path / "bad.yaml").write_text("providers: {}\n")
    with pytest.raises(LLMError, match="LLM router config"):
        await RouterEngine(load_settings(llm={"engine": "router", "router": {"config": str(tmp_path / "bad.yaml")}})).start()


def test_settings_need_a_router_file() -> None:
    with pytest.raises(ConfigError, match="llm.router.config must name"):
        load_settings(llm={"engine": "router"})


async def test_local_channel_without_engine_is_excluded(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    router = Router(load_config(write(tmp_path / "r.yaml", local_config(ups))))
    ex = router.explain("tag:local")
    assert ex["plan"] == [] and {"channel": "embedded", "reason": "local engine not loaded in this process"} in ex["excluded"]
    await router.close()


async def test_router_api_mounted_in_the_main_app(tmp_path: Path, ups: list[OpenAITestServer], monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from avatarchat.server.app import create_app

    monkeypatch.setenv("ROUTER_TEST_ADMIN", "t")
    path = write(tmp_path / "r.yaml", base_config(ups))
    settings = load_settings(llm={"engine": "router", "router": {"config": str(path), "mount_api": True}})
    engine = RouterEngine(settings)
    await engine.start()
    app = create_app(settings)
    app.state.engines = SimpleNamespace(llm=engine)  # the lifespan (model loading) is not what this tests
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            r = await c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "answer from b ."
            r = await c.get("/router/admin/channels", headers={"authorization": "Bearer t"})
            assert r.status_code == 200 and len(r.json()["channels"]) == 3
        from avatarchat.server.app import router_channels

        ready = router_channels(engine)  # what /ready shows under dependencies.llm.channels
        assert ready is not None and {c["name"] for c in ready} == {c["name"] for c in r.json()["channels"]}
        assert all(set(c) == {"name", "state", "available", "unavailable_reason", "last_error"} for c in ready)
        assert router_channels(object()) is None
    finally:
        await engine.close()


def make_cache(path: Path, n: int, provider: str = "a") -> None:
    models = [{"id": f"vendor{i % 40}/model-{i}-{(i % 9) + 1}b" + (":free" if i % 3 == 0 else ""),
               "context_length": 8192, "pricing": {"prompt": "0" if i % 3 == 0 else "0.000001", "completion": "0.000002"},
               "description": "x" * 200} for i in range(n)]
    path.write_text(json.dumps({"version": 1, "providers": {provider: {"models": models}}}))


async def test_cold_start_from_cache_builds_snapshot_and_index(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    cache = tmp_path / "cache" / "models.json"
    cache.parent.mkdir()
    make_cache(cache, 3000)
    cfg = base_config(ups, discovery_cache="cache/models.json")
    cfg["channels"].append({"name": "wild", "provider": "a", "models": ["*"], "tags": ["disc"]})
    path = write(tmp_path / "r.yaml", cfg)
    router = Router(load_config(path), path)
    await router.start()
    try:
        assert not router.state.index.complete.is_set()  # serving starts before the index is complete
        assert router.explain("gpt-4o")["plan"]  # the YAML's own models are there at once
        # A discovered model: the request waits for the index rather than answering 404.
        _, _, _, cands = await router.plan("vendor7/model-7-8b", None)
        assert cands[0].entry.channel == "wild"
        assert discovery.snapshot_path(cache).is_file()  # the stale/missing snapshot was rebuilt
        await router.state.index.complete.wait()
        assert len(router.state.index.entries) == 3000 + 6
        free = router.explain("tag:disc,free")
        assert free["candidate_count"] == 1000
    finally:
        await router.close()
    # Second start: the snapshot is current and read directly.
    t0 = time.monotonic()
    router = Router(load_config(path), path)
    await router.start()
    await router.state.index.complete.wait()
    assert time.monotonic() - t0 < 2 and len(router.state.index.entries) == 3006
    await router.close()


async def test_discovery_fetches_models_when_no_cache(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    ups[0].behaviour.models = ["found/one-7b", "found/two-70b"]
    cfg = base_config(ups, discovery_cache="models.json")
    cfg["providers"]["a"]["discovery"] = True
    cfg["channels"].append({"name": "wild", "provider": "a", "models": ["*"]})
    path = write(tmp_path / "r.yaml", cfg)
    router = Router(load_config(path), path)
    await router.start()
    try:
        await router.state.index.complete.wait()
        assert [e.channel for e in router.state.index.models("found/two-70b")] == ["wild"]
        assert discovery.read_snapshot(tmp_path / "models.json") is not None
    finally:
        await router.close()


@pytest.mark.models
async def test_embedded_llama_is_the_local_channel(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    cfg = local_config(ups)
    cfg["retry"].update(ttft_timeout_s=60, stall_timeout_s=60)  # a CPU model on a shared machine
    path = write(tmp_path / "r.yaml", cfg)
    engine = RouterEngine(load_settings(llm={"engine": "router", "router": {"config": str(path), "model": "tag:local"}}))
    await engine.start()
    try:
        text = "".join([d async for d in engine.stream([{"role": "user", "content": "Say hi."}], max_tokens=12, temperature=0)])
        assert text.strip()
        assert not any(u.requests for u in ups)
    finally:
        await engine.close()


async def test_exact_model_is_served_before_the_index_is_complete(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    cache = tmp_path / "models.json"
    make_cache(cache, 2000)
    discovery.build_snapshot(cache)
    cfg = base_config(ups, discovery_cache="models.json")
    cfg["channels"].append({"name": "wild", "provider": "a", "models": ["*"]})
    path = write(tmp_path / "r.yaml", cfg)
    router = Router(load_config(path), path)
    await router.start()
    try:
        _, _, _, cands = await router.plan("vendor39/model-1999-2b", None)  # the last model of the cache
        assert [c.entry.channel for c in cands] == ["wild"]
        assert not router.state.index.complete.is_set()  # found by scanning the snapshot, not the index
        with pytest.raises(Exception, match="no channel serves"):
            await router.plan("vendor9/not-there", None)
    finally:
        await router.close()


async def test_old_discovery_cache_is_refreshed(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    import os

    cache = tmp_path / "models.json"
    discovery.write_cache(cache, {"a": [{"id": "old/model-7b"}]})
    old = time.time() - 7200
    os.utime(cache, (old, old))
    discovery.build_snapshot(cache)  # a current snapshot of an old cache
    ups[0].behaviour.models = ["new/model-8b"]
    cfg = base_config(ups, discovery_cache="models.json", discovery_max_age_s=3600)
    cfg["providers"]["a"]["discovery"] = True
    cfg["channels"].append({"name": "wild", "provider": "a", "models": ["*"]})
    path = write(tmp_path / "r.yaml", cfg)
    router = Router(load_config(path), path)
    await router.start()
    try:
        deadline = time.monotonic() + 5
        while not router.state.index.models("new/model-8b") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert router.state.index.models("new/model-8b") and not router.state.index.models("old/model-7b")
        assert router.state.generation == 2 and discovery.read_snapshot(cache) == [("a", "new/model-8b", None, None, None)]
    finally:
        await router.close()


@pytest.mark.models
async def test_each_session_picks_its_model_through_the_router(
    tmp_path: Path, ups: list[OpenAITestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web app's LLM setting: with llm.engine router, `session.update` picks any model, alias or tag
    query a channel serves, for that session only; one no channel serves is refused with the reason."""
    from tests.support.live_app import LiveApp
    from tests.test_server import open_client

    monkeypatch.setenv("ROUTER_TEST_ADMIN", "t")
    path = write(tmp_path / "r.yaml", base_config(ups))
    settings = load_settings(
        llm={"engine": "router", "max_tokens": 20, "router": {"config": str(path), "model": "llama-3-70b"}},
        avatar={"dir": str(tmp_path / "avatars")},
    )
    app = LiveApp(settings).start()
    try:
        a, b = await open_client(app), await open_client(app)
        await a.send(type="session.update", llm={"provider": "router", "model": "nope-model"})
        err = await a.event()
        assert err["type"] == "error" and err["code"] == "invalid_field" and "nope-model" in err["message"], err
        await a.send(type="session.update", llm={"provider": "router", "model": "x" * 201})
        err = await a.event()
        assert err["type"] == "error" and err["code"] == "invalid_field" and "200 characters" in err["message"], err
        await a.send(type="session.update", llm={"provider": "router", "model": "smart"})  # alias of gpt-4o
        updated = await a.event()
        assert updated["type"] == "session.updated" and updated["settings"]["llm"]["model"] == "smart", updated
        offered = {o["model"] for o in updated["settings"]["options"]["llm"]}
        assert {"llama-3-70b", "smart", "gpt-4o", "shared-model"} <= offered
        for client, answer in ((a, "answer from b ."), (b, "answer from c .")):
            await client.send(type="user_text", text="Hello!")
            done, _ = await client.until("turn_done")
            assert done["reason"] == "complete" and done["text"] == answer, done
        assert len(ups[1].requests) == 1 and len(ups[2].requests) == 1 and not ups[0].requests
        await a.ws.close()
        await b.ws.close()
    finally:
        app.stop()
