"""Seed 001's execution modes against a real loopback LLM server, a real Redis and a real Celery worker."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from avatarchat.config import LLMExecConfig, OpenAIConfig, load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.services.avatar_client import LocalAvatarService
from avatarchat.services.llm_exec import MODES, LLMExecutor
from tests.support.live_app import LiveApp
from tests.support.openai_server import Behaviour, OpenAITestServer
from tests.support.redis_celery import ROOT, CeleryWorker, RedisServer, free_port

MESSAGES = [{"role": "user", "content": "Say hello."}]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def celery_worker(redis_server: RedisServer, openai_server: OpenAITestServer) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(redis_server.url, openai_server.base_url).start()
    worker.wait_beating()
    # Ready when a real task has made the round trip.
    ex = LLMExecutor(OpenAIConfig(base_url=openai_server.base_url),
                     LLMExecConfig(mode="queue", redis_url=redis_server.url, timeout_s=60))
    try:
        ex.chat(MESSAGES)
        assert ex.calls["queue"] == 1, ex.status()
    finally:
        ex.close()
    yield worker
    worker.stop()


def executor(upstream: OpenAITestServer, redis_url: str, mode: str = "asyncio", **kw: object) -> LLMExecutor:
    config = LLMExecConfig(mode=mode, redis_url=redis_url, max_workers=64, timeout_s=30, redis_retry_s=0.5, **kw)
    return LLMExecutor(OpenAIConfig(base_url=upstream.base_url), config)


@pytest.fixture
async def llm(upstream: OpenAITestServer, redis_server: RedisServer, celery_worker: CeleryWorker) -> AsyncIterator[LLMExecutor]:
    ex = executor(upstream, redis_server.url)
    ex.attach(asyncio.get_running_loop())
    yield ex
    await ex.aclose()


async def test_every_mode_gives_the_same_answer_async_and_sync(llm: LLMExecutor, upstream: OpenAITestServer) -> None:
    upstream.behaviour = Behaviour(reply="The same words, whichever way they travel.")
    answers = {}
    for mode in MODES:
        llm.set_mode(mode)
        answers[mode] = await llm.chat_async(MESSAGES, max_tokens=12, temperature=0.0)
        # The sync facade, from a plain thread (as a Flask view would call it).
        answers[mode + "-sync"] = await asyncio.to_thread(llm.chat, MESSAGES, max_tokens=12, temperature=0.0)
    assert set(answers.values()) == {"The same words, whichever way they travel."}, answers
    assert llm.calls == {"asyncio": 2, "threads": 2, "queue": 2}
    sent = [r["body"] for r in upstream.requests]
    assert len(sent) == 6 and all(b["max_tokens"] == 12 and b["messages"] == MESSAGES for b in sent)


async def test_sync_facade_refuses_to_block_an_event_loop(llm: LLMExecutor) -> None:
    with pytest.raises(RuntimeError, match="chat_async"):
        llm.chat(MESSAGES)


@pytest.mark.parametrize("mode", MODES)
async def test_50_concurrent_calls_to_a_1s_upstream_take_under_5s(llm: LLMExecutor, upstream: OpenAITestServer,
                                                                  mode: str) -> None:
    upstream.behaviour = Behaviour(reply="slow but steady", first_token_delay_s=1.0)
    llm.set_mode(mode)
    start = time.perf_counter()
    replies = await asyncio.gather(*(llm.chat_async(MESSAGES) for _ in range(50)))
    elapsed = time.perf_counter() - start
    assert replies == ["slow but steady"] * 50
    assert llm.calls[mode] == 50 and llm.fallback is None
    assert elapsed < 5, f"{mode}: 50 calls took {elapsed:.2f} s"


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_failure_is_a_clear_error_in_every_mode(llm: LLMExecutor, upstream: OpenAITestServer,
                                                               mode: str) -> None:
    llm.set_mode(mode)
    upstream.behaviour = Behaviour(status=500)
    with pytest.raises(LLMError, match="answered 500"):
        await llm.chat_async(MESSAGES)
    # …and the next call, once the upstream is back, works: nothing is left broken.
    upstream.behaviour = Behaviour(reply="back again")
    assert await llm.chat_async(MESSAGES) == "back again"


async def test_unreachable_llm_server_is_a_clear_error(redis_server: RedisServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    ex = LLMExecutor(OpenAIConfig(base_url=dead, connect_timeout_s=1), LLMExecConfig(redis_url=redis_server.url))
    for mode in ("asyncio", "threads"):
        ex.set_mode(mode)
        with pytest.raises(LLMError, match="unreachable"):
            await ex.chat_async(MESSAGES)
    await ex.aclose()


async def test_redis_down_falls_back_to_asyncio_logged_and_shown(upstream: OpenAITestServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    ex = executor(upstream, f"redis://127.0.0.1:{free_port()}/0", mode="queue")
    with caplog.at_level(logging.WARNING, logger="avatarchat.services.llm_exec"):
        replies = await asyncio.gather(*(ex.chat_async(MESSAGES) for _ in range(5)))
    assert replies == [Behaviour().reply] * 5
    assert ex.calls == {"asyncio": 5}
    status = ex.status()
    assert status["mode"] == "queue" and status["effective_mode"] == "asyncio" and "Redis" in status["fallback"]
    assert any("fall back to asyncio" in r.getMessage() for r in caplog.records)
    deps = await ex.dependencies()
    assert deps["redis"]["ok"] is False and deps["redis"]["required"] is True and deps["llm_channel"]["ok"] is True
    await ex.aclose()


async def test_redis_going_down_and_coming_back(tmp_path: Path, upstream: OpenAITestServer,
                                                openai_server: OpenAITestServer) -> None:
    redis = RedisServer(tmp_path).start()
    worker = CeleryWorker(redis.url, openai_server.base_url, concurrency=4).start()
    ex = executor(upstream, redis.url, mode="queue")
    try:
        await asyncio.to_thread(worker.wait_beating)
        assert await ex.chat_async(MESSAGES) == Behaviour().reply and ex.calls["queue"] == 1
        redis.stop()
        assert await ex.chat_async(MESSAGES) == Behaviour().reply  # answered, in asyncio mode
        assert ex.calls["asyncio"] == 1 and ex.status()["effective_mode"] == "asyncio"
        redis.start()
        await asyncio.sleep(0.6)  # redis_retry_s
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker reconnects on its own schedule; the calls go on meanwhile
            await ex.chat_async(MESSAGES)
            if ex.calls["queue"] >= 2:
                break
            await asyncio.sleep(0.2)
        assert ex.calls["queue"] >= 2 and ex.fallback is None and ex.status()["effective_mode"] == "queue"
    finally:
        await ex.aclose()
        worker.stop()
        redis.stop()


async def test_switching_modes_under_load_loses_nothing(llm: LLMExecutor, upstream: OpenAITestServer) -> None:
    upstream.behaviour = Behaviour(reply="still here", first_token_delay_s=0.3)

    async def switcher() -> None:
        for i in range(12):
            llm.set_mode(MODES[i % 3])
            await asyncio.sleep(0.05)

    async def one(i: int) -> str:
        await asyncio.sleep(i * 0.01)
        return await llm.chat_async([{"role": "user", "content": f"request {i}"}])

    results = await asyncio.gather(switcher(), *(one(i) for i in range(60)))
    assert results[1:] == ["still here"] * 60
    assert sum(llm.calls.values()) == 60 and all(llm.calls[m] > 0 for m in MODES), llm.calls
    assert sorted(r["body"]["messages"][0]["content"] for r in upstream.requests) == sorted(
        f"request {i}" for i in range(60)
    )
    assert not +llm.in_flight


def test_llm_endpoints_tasks_admin_and_health(upstream: OpenAITestServer, redis_server: RedisServer,
                                              celery_worker: CeleryWorker, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"services:\n  llm:\n    mode: threads\n    redis_url: {redis_server.url}\n")
    settings = load_settings(cfg, llm={"engine": "openai", "openai": {"base_url": upstream.base_url}},
                             tts={"engine": "espeak"}, avatar={"dir": str(tmp_path / "avatars")})
    app = LiveApp(settings)
    app.app.state.config_path = cfg
    app.start(wait_for="/health")
    try:
        base = app.http
        r = httpx.post(base + "/api/llm/chat", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 200 and r.json() == {"reply": Behaviour().reply, "mode": "threads"}
        assert httpx.post(base + "/api/llm/chat", json={"messages": []}).status_code == 422
        assert httpx.post(base + "/admin/llm-mode", json={"mode": "bogus"}).status_code == 422
        assert httpx.post(base + "/admin/llm-mode", json={"mode": "queue"}).json()["mode"] == "queue"
        assert httpx.post(base + "/api/llm/chat", json={"messages": MESSAGES}, timeout=30).json()["mode"] == "queue"
        # A task, submitted and read back.
        task = httpx.post(base + "/api/llm/tasks", json={"messages": MESSAGES}).json()
        assert task["status"] == "PENDING"
        deadline = time.monotonic() + 20
        while (st := httpx.get(base + task["status_url"]).json())["status"] != "SUCCESS" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert st == {"id": task["id"], "status": "SUCCESS", "result": Behaviour().reply}
        assert httpx.get(base + "/api/llm/tasks/not-an-id").status_code == 400
        # Config reload: the file says threads again.
        assert httpx.post(base + "/admin/reload").json()["llm"]["mode"] == "threads"
        cfg.write_text("services:\n  llm:\n    mode: [broken\n")
        assert httpx.post(base + "/admin/reload").status_code == 400
        health = httpx.get(base + "/health").json()
        assert health["status"] == "ok" and health["role"] == "all" and health["llm_exec"]["mode"] == "threads"
        deps = httpx.get(base + "/ready", timeout=30).json()["dependencies"]
        assert deps["redis"]["ok"] and deps["llm"]["exec"]["channel"]["ok"] and deps["avatar_service"]["ok"]
        # Co-located (role all): the avatar service is called in-process, no HTTP hop.
        assert deps["avatar_service"]["where"] == "in-process"
        assert isinstance(app.app.state.avatar_service, LocalAvatarService)
        # An upstream failure is a 502 with the reason.
        upstream.behaviour = Behaviour(status=503)
        r = httpx.post(base + "/api/llm/chat", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 502 and "503" in r.json()["detail"]
    finally:
        app.stop()


def test_admin_token_is_required_when_set(upstream: OpenAITestServer, tmp_path: Path) -> None:
    settings = load_settings(services={"admin_token": "s3cret"}, llm={"engine": "openai"}, tts={"engine": "espeak"},
                             avatar={"dir": str(tmp_path)})
    app = LiveApp(settings).start(wait_for="/health")
    try:
        assert httpx.get(app.http + "/admin/llm-mode").status_code == 401
        ok = httpx.post(app.http + "/admin/llm-mode", json={"mode": "threads"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["mode"] == "threads"
    finally:
        app.stop()


def test_flask_example_under_gunicorn_sync_workers(upstream: OpenAITestServer) -> None:
    """The sync facade inside Gunicorn's sync workers: one background loop per worker, not one per call."""
    upstream.behaviour = Behaviour(reply="from flask", first_token_delay_s=0.2)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
               AVATARCHAT_LLM__OPENAI__BASE_URL=upstream.base_url, AVATARCHAT_SERVICES__LLM__MODE="threads")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "-k", "gthread",
                             "--threads", "4", "examples.flask_app.app:create_app()"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "gunicorn did not start"
                time.sleep(0.1)
        with httpx.Client(timeout=20) as c:
            for path in ("/chat", "/chat-async", "/chat"):
                r = c.post(base + path, json={"message": "hi"})
                assert r.status_code == 200 and r.json() == {"reply": "from flask", "mode": "threads"}, r.text
            assert c.post(base + "/chat", json={}).status_code == 400
            assert c.post(base + "/mode", json={"mode": "asyncio"}).json() == "asyncio"
            upstream.behaviour = Behaviour(status=500)
            assert c.post(base + "/chat", json={"message": "hi"}).status_code == 502
    finally:
        proc.terminate()
        proc.wait(15)
