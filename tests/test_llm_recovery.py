"""Issue 14: queue mode recovers when Redis or the Celery worker dies, and no password is ever shown.

Everything is real: redis-server processes, Celery workers (and their supervisor), and the loopback LLM
server; each test starts its own Redis so that killing it touches no other test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import httpx
import pytest

from avatarchat.config import LLMExecConfig, OpenAIConfig, load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.services.llm_exec import LLMExecutor, LLMUnavailable
from avatarchat.services.llm_queue import (
    CALL_KEY,
    QUEUE,
    RESULT_KEY,
    TASK,
    QueueClient,
    QueueUnavailable,
)
from tests.support.live_app import LiveApp
from tests.support.openai_server import Behaviour, OpenAITestServer
from tests.support.redis_celery import ROOT, CeleryWorker, RedisServer, free_port, pid_alive, wait_until

pytestmark = pytest.mark.timeout(180)
PASSWORD = "PASSWORD"


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def sent(upstream: OpenAITestServer, content: str) -> int:
    """How many chat requests with this content the LLM server received."""
    return sum(r["body"]["messages"][0]["content"] == content for r in upstream.requests)


async def call_in_flight(ex: LLMExecutor, worker: CeleryWorker, upstream: OpenAITestServer,
                         first_token_delay_s: float) -> tuple[int, asyncio.Task[Any]]:
    """Once the worker beats, start a call that reaches the LLM and hangs there (reply "slow"): the
    worker's pid and the call."""
    pid = await asyncio.to_thread(worker.wait_beating)
    upstream.behaviour = Behaviour(reply="slow", first_token_delay_s=first_token_delay_s)
    call = asyncio.create_task(ex.reply(ask("in flight")))
    await asyncio.to_thread(wait_until, lambda: sent(upstream, "in flight") == 1, 30, "the worker calls the LLM")
    return pid, call


def executor(upstream: OpenAITestServer, redis_url: str, **kw: object) -> LLMExecutor:
    config = LLMExecConfig(**{"mode": "queue", "redis_url": redis_url, "timeout_s": 30, "redis_retry_s": 0.5,
                              "worker_timeout_s": 3.0, **kw})
    return LLMExecutor(OpenAIConfig(base_url=upstream.base_url), config)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


# -- (A) credentials ------------------------------------------------------------------------------------


def test_no_response_or_log_shows_the_redis_or_llm_password(tmp_path: Path, upstream: OpenAITestServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    redis = RedisServer(tmp_path, password=PASSWORD).start()
    shown = f"redis://:***@127.0.0.1:{redis.port}/0"
    llm_url = upstream.base_url.replace("http://", f"http://user:{PASSWORD}@")
    settings = load_settings(services={"llm": {"mode": "queue", "redis_url": redis.url, "redis_retry_s": 0.2}},
                             llm={"engine": "openai", "openai": {"base_url": llm_url}}, tts={"engine": "espeak"},
                             avatar={"dir": str(tmp_path / "avatars")})
    app = LiveApp(settings)
    caplog.set_level(logging.DEBUG)
    try:
        app.start(wait_for="/health")
        base = app.http
        # Redis up, no worker: not ready, and why.
        r = httpx.get(base + "/ready", timeout=30)
        assert r.status_code == 503 and PASSWORD not in r.text, r.text
        deps = r.json()["dependencies"]
        assert deps["redis"] == {**deps["redis"], "ok": True, "url": shown}
        assert deps["llm"]["exec"]["channel"]["url"] == llm_url.replace(f":{PASSWORD}@", ":***@")
        assert any("no live Celery worker" in reason for reason in r.json()["not_ready"]), r.json()
        redis.kill()
        # Redis down: every answer that names it shows the URL without its password. (The first calls
        # may still give the cached "no live worker" as the reason.)
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(base + "/api/llm/chat", json={"messages": ask("hi")}, timeout=30)
            assert r.status_code == 200 and r.headers["x-llm-fallback"] == "asyncio" and PASSWORD not in r.text
            if shown in r.json()["fallback"]["reason"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert shown in r.json()["fallback"]["reason"], r.json()
        r = httpx.get(base + "/health")
        assert PASSWORD not in r.text and shown in r.json()["llm_exec"]["fallback"], r.text
        r = httpx.post(base + "/api/llm/tasks", json={"messages": ask("hi")}, timeout=30)
        assert r.status_code == 503 and PASSWORD not in r.text and shown in r.json()["detail"], r.text
        assert int(r.headers["retry-after"]) >= 1
        r = httpx.get(base + "/ready", timeout=30)
        assert r.status_code == 503 and PASSWORD not in r.text and shown in r.text
    finally:
        app.stop()
        redis.kill()
    records = [r for r in caplog.records if r.name.startswith("avatarchat")]
    assert any("fall back" in r.getMessage() for r in records)
    for record in records:  # what our code logs, before any formatter
        assert PASSWORD not in f"{record.getMessage()} {record.__dict__}", record.__dict__


# -- (B) worker liveness and fallback ----------------------------------------------------------------------


async def test_no_live_worker_falls_back_at_once_or_fails_fast(redis: RedisServer, upstream: OpenAITestServer) -> None:
    ex = executor(upstream, redis.url)
    try:
        start = time.monotonic()
        reply = await ex.reply(ask("fallback"))
        assert time.monotonic() - start < 10  # not the 30 s timeout
        assert reply.text == Behaviour().reply and reply.mode == "asyncio"
        assert reply.fallback is not None and "no live Celery worker" in reply.fallback
        assert sent(upstream, "fallback") == 1 and ex.status()["effective_mode"] == "asyncio"
        deps = await ex.dependencies()
        assert deps["redis"]["ok"] and deps["queue_worker"]["ok"] is False and deps["queue_worker"]["required"]

        ex.apply(ex.config.model_copy(update={"fallback": "none"}))
        with pytest.raises(LLMUnavailable, match="no live Celery worker") as failed:
            await ex.chat_async(ask("no fallback"))
        assert failed.value.retry_after_s == 0.5 and sent(upstream, "no fallback") == 0
        assert ex.status()["effective_mode"] == "none"
    finally:
        await ex.aclose()


def test_fallback_none_is_a_503_with_retry_after(redis: RedisServer, upstream: OpenAITestServer, tmp_path: Path) -> None:
    settings = load_settings(services={"llm": {"mode": "queue", "redis_url": redis.url, "fallback": "none"}},
                             llm={"engine": "openai", "openai": {"base_url": upstream.base_url}},
                             tts={"engine": "espeak"}, avatar={"dir": str(tmp_path / "avatars")})
    app = LiveApp(settings).start(wait_for="/health")
    try:
        r = httpx.post(app.http + "/api/llm/chat", json={"messages": ask("hi")}, timeout=30)
        assert r.status_code == 503 and "no live Celery worker" in r.json()["detail"], r.text
        assert r.headers["retry-after"] == "2"  # redis_retry_s, rounded up
        assert not upstream.requests
    finally:
        app.stop()


async def test_worker_killed_mid_call_the_call_falls_back_and_the_supervisor_restarts_it(
        redis: RedisServer, upstream: OpenAITestServer) -> None:
    worker = CeleryWorker(redis.url, upstream.base_url, concurrency=4, worker_timeout_s=3.0, supervised=True).start()
    ex = executor(upstream, redis.url)
    try:
        first, call = await call_in_flight(ex, worker, upstream, first_token_delay_s=30)
        upstream.behaviour = Behaviour(reply="answered anyway")
        os.kill(first, signal.SIGKILL)
        start = time.monotonic()
        reply = await asyncio.wait_for(call, 30)
        # Given up once the worker stopped beating (worker_timeout_s), not after the 30 s timeout.
        assert time.monotonic() - start < 15 and reply.mode == "asyncio" and reply.text == "answered anyway"
        assert reply.fallback is not None and "worker running the call" in reply.fallback and "stopped" in reply.fallback

        second = await asyncio.to_thread(worker.wait_beating)  # the supervisor started a new one
        assert second != first and not pid_alive(first)
        await asyncio.sleep(0.6)  # redis_retry_s
        deadline = time.monotonic() + 30
        while ex.calls["queue"] == 0 and time.monotonic() < deadline:
            await ex.chat_async(ask("after"))
            await asyncio.sleep(0.2)
        assert ex.calls["queue"] >= 1 and ex.status()["effective_mode"] == "queue"
        assert sent(upstream, "in flight") == 2  # the dead worker's and the fallback's, never a third
    finally:
        await ex.aclose()
        supervisor = worker.proc
        assert supervisor is not None
        children = worker.children()
        worker.stop()
    assert supervisor.returncode == 0 and not any(pid_alive(p) for p in children)


def test_a_supervisor_killed_outright_takes_its_worker_with_it(redis: RedisServer, upstream: OpenAITestServer) -> None:
    worker = CeleryWorker(redis.url, upstream.base_url, concurrency=2, supervised=True).start()
    child: int | None = None
    try:
        child = worker.wait_beating()
        assert worker.proc is not None
        worker.proc.kill()
        worker.proc.wait(10)
        orphan = child
        wait_until(lambda: not pid_alive(orphan), 30, "the orphaned worker exits")
    finally:
        worker.stop()
        if child is not None and pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_supervisor_stops_its_worker_on_ctrl_c_and_sigterm(redis: RedisServer, upstream: OpenAITestServer) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        worker = CeleryWorker(redis.url, upstream.base_url, concurrency=2, supervised=True).start()
        try:
            child = worker.wait_beating()
            assert worker.proc is not None
            worker.proc.send_signal(sig)
            assert worker.proc.wait(30) == 0 and not pid_alive(child)
        finally:
            worker.stop()


async def test_worker_survives_redis_dying_mid_call(redis: RedisServer, upstream: OpenAITestServer) -> None:
    """Celery 5.7.0 with late acks: 'Unrecoverable error: AttributeError ... hostname', and the worker exited."""
    worker = CeleryWorker(redis.url, upstream.base_url, concurrency=4).start()
    ex = executor(upstream, redis.url)
    try:
        pid, call = await call_in_flight(ex, worker, upstream, first_token_delay_s=3)
        redis.kill()
        reply = await asyncio.wait_for(call, 30)
        assert reply.mode == "asyncio" and reply.text == "slow"  # answered in-process meanwhile
        upstream.behaviour = Behaviour()
        redis.start()  # the same port
        assert await asyncio.to_thread(worker.wait_beating) == pid  # the same worker, reconnected
        assert worker.proc is not None and worker.proc.poll() is None
        await asyncio.sleep(0.6)  # redis_retry_s
        deadline = time.monotonic() + 30
        while ex.calls["queue"] == 0 and time.monotonic() < deadline:
            await ex.chat_async(ask("after"))
            await asyncio.sleep(0.2)
        assert ex.calls["queue"] >= 1 and ex.status()["effective_mode"] == "queue"
        assert sent(upstream, "in flight") == 2  # the worker's and the fallback's: no redelivered third
        # No result waits in Redis for a caller that is not coming: a waited call's is never stored.
        client = redis.client()
        assert client.keys(RESULT_KEY + "*") == []
        client.close()
    finally:
        await ex.aclose()
        worker.stop()


# -- (B) deduplication and stale calls ----------------------------------------------------------------------


def test_a_task_delivered_twice_calls_the_llm_once(redis: RedisServer, upstream: OpenAITestServer) -> None:
    worker = CeleryWorker(redis.url, upstream.base_url, concurrency=4).start()
    client = QueueClient(redis.url)
    celery = client._celery
    try:
        worker.wait_beating()
        upstream.behaviour = Behaviour(reply="only once", first_token_delay_s=1)
        task_id = "00000000-0000-4000-8000-000000000001"
        args = [ask("twice"), 20, 0.0]
        # Two deliveries of one task, as a publish retry or a redelivery makes them.
        celery.send_task(TASK, args=args, task_id=task_id)
        celery.send_task(TASK, args=args, task_id=task_id)
        store = redis.client()

        def status() -> str | None:
            raw = store.get(RESULT_KEY + task_id)
            return None if raw is None else str(json.loads(raw)["status"])

        wait_until(lambda: status() == "SUCCESS", 30, "the task succeeds")
        # A third, after it finished: the stored reply again, still no second LLM call.
        store.delete(RESULT_KEY + task_id)
        celery.send_task(TASK, args=args, task_id=task_id)
        wait_until(lambda: status() == "SUCCESS", 30, "the late copy answers")
        assert store.llen(QUEUE) == 0
        assert sent(upstream, "twice") == 1
        assert json.loads(store.get(RESULT_KEY + task_id) or "{}")["result"] == "only once"
        store.close()
    finally:
        celery.close()
        worker.stop()


async def test_calls_given_up_do_not_run_when_a_worker_comes_back(redis: RedisServer,
                                                                  upstream: OpenAITestServer) -> None:
    client = QueueClient(redis.url)
    store = redis.client()
    worker: CeleryWorker | None = None
    try:
        # No worker runs: one call times out, another is cancelled (its client went away).
        with pytest.raises(LLMError, match="no answer within"):
            await client.chat(ask("timed out"), 20, 0.0, timeout=0.5)
        cancelled = asyncio.create_task(client.chat(ask("cancelled"), 20, 0.0, timeout=120))
        await asyncio.to_thread(wait_until, lambda: store.llen(QUEUE) == 2, 30, "the call is queued")
        cancelled.cancel()
        # (On a very busy machine its own check may see no worker first: given up all the same.)
        with pytest.raises((asyncio.CancelledError, QueueUnavailable)):
            await cancelled
        abandoned = [k.decode() if isinstance(k, bytes) else k for k in store.keys(CALL_KEY + "*")]
        assert len(abandoned) == 2 and all(store.get(k) == b"abandoned" for k in abandoned)
        assert store.llen(QUEUE) == 2  # both still queued, for any worker that comes

        worker = CeleryWorker(redis.url, upstream.base_url, concurrency=4).start()
        await asyncio.to_thread(worker.wait_beating)
        assert await client.chat(ask("fresh"), 20, 0.0, timeout=30) == Behaviour().reply  # queued after them
        assert store.llen(QUEUE) == 0
        assert sent(upstream, "timed out") == sent(upstream, "cancelled") == 0 and sent(upstream, "fresh") == 1
        assert store.keys(RESULT_KEY + "*") == []  # no result or REVOKED note kept for any of them
    finally:
        await client.close()
        store.close()
        if worker is not None:
            worker.stop()


async def test_redis_down_is_queue_unavailable_with_the_url_redacted() -> None:
    client = QueueClient(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(QueueUnavailable) as down:
            await client.worker()
        assert PASSWORD not in str(down.value) and "redis://:***@127.0.0.1:" in str(down.value)
    finally:
        await client.close()


def test_supervise_needs_a_command() -> None:
    r = subprocess.run([sys.executable, "-m", "avatarchat.supervise"], check=False, capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}"}, timeout=60)
    assert r.returncode == 2 and "no command" in r.stderr
