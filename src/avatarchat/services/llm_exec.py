"""Seed 001's execution modes for slow LLM calls, switchable at run time.

- ``asyncio``: one pooled ``httpx.AsyncClient`` on the event loop;
- ``threads``: a pool of ``max_workers`` threads, each call a blocking ``httpx.Client`` request;
- ``queue``: a Celery task on a worker, Redis as broker and result backend (services/llm_queue.py).

``LLMExecutor.chat_async`` and ``LLMExecutor.chat`` have the same signature. Each call reads the mode
once, when it starts, so switching modes never drops a call in flight. If Redis is unreachable or no
Celery worker is alive in ``queue`` mode, calls run in ``asyncio`` mode instead (``fallback: asyncio``,
logged, and shown by ``status()``, so by /health and /ready, until queue mode works again) or fail at
once with ``LLMUnavailable`` (``fallback: none``).

The sync facade never makes an event loop per call: it hands the coroutine to the executor's home loop,
the server's loop (``attach``) or, in a plain sync program (Flask, Gunicorn sync workers), one
background loop thread per process, made on first use (after a fork, again in the child).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx

from avatarchat.config import LLMExecConfig, OpenAIConfig
from avatarchat.engines.llm.base import LLMError
from avatarchat.redact import redact_url

log = logging.getLogger(__name__)
Mode = Literal["asyncio", "threads", "queue"]
MODES: tuple[Mode, ...] = ("asyncio", "threads", "queue")
T = TypeVar("T")


class LLMUnavailable(LLMError):
    """Queue mode cannot run the call and ``fallback`` is none: try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Reply:
    text: str
    mode: Mode  # the mode the call ran in
    fallback: str | None = None  # why it did not run in the mode asked for


def _request(cfg: OpenAIConfig, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> dict[str, Any]:
    return {"model": cfg.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "stream": False}


def _headers(cfg: OpenAIConfig) -> dict[str, str]:
    key = cfg.resolved_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _timeout(cfg: OpenAIConfig, total: float) -> httpx.Timeout:
    return httpx.Timeout(connect=cfg.connect_timeout_s, read=total, write=10.0, pool=total)


def _reply(r: httpx.Response) -> str:
    if r.status_code != 200:
        raise LLMError(f"LLM server answered {r.status_code}: {r.text[:300]}")
    try:
        return str(r.json()["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LLMError(f"LLM server sent an unexpected answer: {r.text[:200]!r}") from e


# Below the shortest common server keep-alive timeout (uvicorn and Node: 5 s). httpx's default is also
# 5 s, so a POST could go out on a connection the server was closing at that moment, and httpx does not
# resend a POST: a lost request (seen in tests/test_llm_exec.py).
KEEPALIVE_EXPIRY_S = 2.0


class SyncChannel:
    """Blocking chat calls (threads mode and the Celery worker); one pooled client, thread-safe."""

    def __init__(self, cfg: OpenAIConfig, exec_cfg: LLMExecConfig) -> None:
        self._cfg = cfg
        self._client = httpx.Client(
            base_url=cfg.base_url.rstrip("/") + "/", headers=_headers(cfg), timeout=_timeout(cfg, exec_cfg.timeout_s),
            limits=httpx.Limits(max_connections=max(exec_cfg.max_workers, exec_cfg.worker_concurrency),
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        try:
            r = self._client.post("chat/completions", json=_request(self._cfg, messages, max_tokens, temperature))
        except httpx.HTTPError as e:
            raise LLMError(redact_url(f"LLM server unreachable or failed: {type(e).__name__}: {e}")) from e
        return _reply(r)

    def close(self) -> None:
        self._client.close()


class AsyncChannel:
    def __init__(self, cfg: OpenAIConfig, exec_cfg: LLMExecConfig) -> None:
        self._cfg = cfg
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url.rstrip("/") + "/", headers=_headers(cfg), timeout=_timeout(cfg, exec_cfg.timeout_s),
            limits=httpx.Limits(max_connections=exec_cfg.max_connections, max_keepalive_connections=32,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        try:
            r = await self._client.post("chat/completions", json=_request(self._cfg, messages, max_tokens, temperature))
        except httpx.HTTPError as e:
            raise LLMError(redact_url(f"LLM server unreachable or failed: {type(e).__name__}: {e}")) from e
        return _reply(r)

    async def health(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            r = await self._client.get("models", timeout=2.0)
            out: dict[str, Any] = {"ok": r.status_code == 200}
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            out = {"ok": False, "error": redact_url(f"{type(e).__name__}: {e}")}
        out["ms"] = round(1000 * (time.perf_counter() - start), 1)
        return out

    async def close(self) -> None:
        await self._client.aclose()


class LLMExecutor:
    """LLM chat calls in the configured mode; one per process."""

    def __init__(self, openai: OpenAIConfig, config: LLMExecConfig, *, max_tokens: int = 160,
                 temperature: float = 0.6) -> None:
        self._openai = openai
        self._config = config
        self._mode: Mode = config.mode
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.fallback: str | None = None  # why queue mode cannot run calls, while it cannot
        self._queue_down_at = 0.0
        self.calls: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._async: AsyncChannel | None = None
        self._sync: SyncChannel | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._queue: Any = None  # QueueClient, imported on first use (Celery is heavy)

    # -- configuration -------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def config(self) -> LLMExecConfig:
        return self._config

    def set_mode(self, mode: str) -> Mode:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        old, self._mode = self._mode, mode  # type: ignore[assignment]
        if mode != "queue":
            self.fallback = None
        if old != mode:
            log.info("LLM execution mode switched", extra={"from": old, "to": mode})
        return self._mode

    def apply(self, config: LLMExecConfig) -> None:
        """Take a reloaded config: the mode now; pool sizes and addresses for clients made after this."""
        self._config = config
        self.set_mode(config.mode)

    # -- the home loop -------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` (the server's, which lives as long as the process) the home of every call."""
        with self._lock:
            self._loop = loop

    def _home(self) -> asyncio.AbstractEventLoop:
        if self._pid != os.getpid():  # forked (Gunicorn): the parent's loop thread and sockets are not ours
            self._reset()
        with self._lock:
            # Not the caller's running loop: Flask's async views run each request on a loop of its own.
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="llm-loop")
                self._loop_thread.start()
            return self._loop

    def _on_home(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T] | asyncio.Future[T]:
        home = self._home()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is home:
            return coro
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))

    # -- calls ---------------------------------------------------------------------------------------

    async def chat_async(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                         temperature: float | None = None) -> str:
        """The assistant's reply to ``messages`` (LLMError with the reason if there is none)."""
        return (await self.reply(messages, max_tokens=max_tokens, temperature=temperature)).text

    async def reply(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                    temperature: float | None = None) -> Reply:
        """``chat_async``, also saying which mode the call ran in and why, if not the one asked for."""
        return await self._on_home(self._chat(messages, max_tokens, temperature))

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
             temperature: float | None = None) -> str:
        """``chat_async`` for sync callers (Flask views, threads); not to be called on an event loop."""
        home = self._home()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("chat() blocks: on an event loop, await chat_async() instead")
        fut = asyncio.run_coroutine_threadsafe(self._chat(messages, max_tokens, temperature), home)
        return fut.result().text

    async def _chat(self, messages: list[dict[str, str]], max_tokens: int | None, temperature: float | None) -> Reply:
        mt = self.max_tokens if max_tokens is None else max_tokens
        temp = self.temperature if temperature is None else temperature
        mode = self._mode  # read once: a switch affects the calls that start after it
        if mode == "queue":
            from avatarchat.services.llm_queue import QueueUnavailable

            # After a failure queue mode rests for redis_retry_s: calls meanwhile ask neither Redis nor a worker.
            if time.monotonic() - self._queue_down_at >= self._config.redis_retry_s:
                try:
                    client = self._queue_client()
                    await client.require_worker()  # no call is published to wait for a worker that is gone
                    text = await self._counted("queue", client.chat(messages, mt, temp, self._config.timeout_s))
                    return Reply(text, "queue")
                except QueueUnavailable as e:
                    self._queue_down_at = time.monotonic()
                    if self.fallback is None:
                        log.warning("queue mode unavailable: calls %s", "fall back to asyncio"
                                    if self._config.fallback == "asyncio" else "fail (fallback none)",
                                    extra={"error": str(e)})
                    self.fallback = str(e)
            reason = self.fallback or "queue mode unavailable"
            if self._config.fallback == "none":
                raise LLMUnavailable(f"queue mode unavailable: {reason}", self._config.redis_retry_s)
            return Reply(await self._counted("asyncio", self._async_channel().chat(messages, mt, temp)), "asyncio",
                         reason)
        if mode == "threads":
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(self._thread_pool(), self._sync_channel().chat, messages, mt, temp)
            return Reply(await self._counted("threads", call), "threads")
        return Reply(await self._counted("asyncio", self._async_channel().chat(messages, mt, temp)), "asyncio")

    async def _counted(self, mode: str, call: Any) -> str:
        self.in_flight[mode] += 1
        try:
            result: str = await call
        finally:
            self.in_flight[mode] -= 1
        self.calls[mode] += 1
        if mode == "queue" and self.fallback is not None:
            log.info("queue mode restored")
            self.fallback = None
        return result

    # -- resources, made on first use on the home loop ---------------------------------------------------

    def _async_channel(self) -> AsyncChannel:
        if self._async is None:
            self._async = AsyncChannel(self._openai, self._config)
        return self._async

    def _sync_channel(self) -> SyncChannel:
        if self._sync is None:
            self._sync = SyncChannel(self._openai, self._config)
        return self._sync

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size != self._config.max_workers:
            self._pool_size = self._config.max_workers
            old, self._pool = self._pool, ThreadPoolExecutor(self._pool_size, thread_name_prefix="llm-call")
            if old is not None:
                old.shutdown(wait=False)  # its calls in flight still finish
        return self._pool

    def _queue_client(self) -> Any:
        from avatarchat.services.llm_queue import QueueClient

        if (self._queue is None or self._queue.redis_url != self._config.redis_url
                or self._queue.worker_timeout_s != self._config.worker_timeout_s):
            self._queue = QueueClient(self._config.redis_url, self._config.worker_timeout_s)
        return self._queue

    async def submit(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                     temperature: float | None = None) -> str:
        """Queue a chat as a Celery task; its id (QueueUnavailable if Redis is down or no worker is alive)."""
        mt = self.max_tokens if max_tokens is None else max_tokens
        temp = self.temperature if temperature is None else temperature
        return await self._on_home(self._queue_client().submit(messages, mt, temp))  # type: ignore[no-any-return]

    async def task_status(self, task_id: str) -> dict[str, Any]:
        return await self._on_home(self._queue_client().status(task_id))  # type: ignore[no-any-return]

    # -- health --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The mode and counters, from memory (for /health: it asks nothing of Redis or the worker)."""
        falling_back = self._mode == "queue" and self.fallback
        effective = ("asyncio" if self._config.fallback == "asyncio" else "none") if falling_back else self._mode
        out: dict[str, Any] = {"mode": self._mode, "effective_mode": effective, "max_workers": self._config.max_workers,
                               "in_flight": dict(+self.in_flight), "calls": dict(self.calls)}
        if falling_back:
            out["fallback"] = f"{self._config.fallback} ({self.fallback})"
        return out

    async def dependencies(self) -> dict[str, Any]:
        """Reachability of the LLM channel, of Redis and of a live Celery worker, for /ready."""
        from avatarchat.services.llm_queue import QueueUnavailable

        required = self._mode == "queue"

        async def redis() -> dict[str, Any]:
            start = time.perf_counter()
            try:
                await self._queue_client().ping()
                out: dict[str, Any] = {"ok": True}
            except QueueUnavailable as e:
                out = {"ok": False, "error": str(e)}
            out.update(url=redact_url(self._config.redis_url), required=required,
                       ms=round(1000 * (time.perf_counter() - start), 1))
            return out

        async def worker() -> dict[str, Any]:
            try:
                seen = await self._queue_client().worker()
                out: dict[str, Any] = {"ok": seen["alive"], **{k: v for k, v in seen.items() if k != "alive"}}
            except QueueUnavailable as e:
                out = {"ok": False, "error": str(e)}
            out["required"] = required
            return out

        async def all_of_them() -> dict[str, Any]:
            llm, r, w = await asyncio.gather(self._async_channel().health(), redis(), worker())
            llm["url"] = redact_url(self._openai.base_url)
            return {"llm_channel": llm, "redis": r, "queue_worker": w}

        return await self._on_home(all_of_them())  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            await self._on_home(self._close_resources())
        self._shutdown()

    def close(self) -> None:
        """Close from sync code (a sync program that owns its executor); not on the home loop."""
        if self._loop_thread is not None and self._loop is not None and self._pid == os.getpid():
            asyncio.run_coroutine_threadsafe(self._close_resources(), self._loop).result(10)
        self._shutdown()

    async def _close_resources(self) -> None:
        if self._async is not None:
            await self._async.close()
        if self._queue is not None:
            await self._queue.close()

    def _shutdown(self) -> None:
        if self._sync is not None:
            self._sync.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._loop_thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            self._loop.close()
        self._reset()
