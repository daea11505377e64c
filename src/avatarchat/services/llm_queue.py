"""Queue mode: LLM calls as Celery tasks, Redis as broker and result backend.

The worker side is ``avatarchat.services.llm_tasks`` (``celery -A avatarchat.services.llm_tasks worker``).
This side submits by task name and waits without polling: each waited call's outcome is published on
the channel ``celery-task-meta-<id>`` (by the task, in the Redis backend's format), and one pattern
subscription per process hands each outcome to the coroutine waiting for it.

Recovery (issue 14):
- each worker's consumer writes ``WORKER_KEY`` and its own ``worker_key(id)`` (a TTL of
  ``worker_timeout_s``) while it is connected and consuming, so this side knows whether a live worker
  exists (cached ``LIVENESS_CACHE_S``): with none, calls are not published to wait in vain;
- a call runs the LLM at most once per task id (``CALL_KEY`` + id, claimed with SET NX by the worker,
  naming itself): a second delivery of the same task returns the first one's outcome, or nothing; and a
  call whose worker stops beating is given up at once, even when another worker has taken its place;
- a call its caller gave up (timeout, cancelled, worker gone) is marked abandoned: the worker skips it
  if it has not started it; the message also expires after the call's timeout, so a worker that comes
  back later does not run stale calls;
- a waited call's outcome is published to its caller and never stored (ignore_result): when the
  caller has gone, nothing is kept. A task submitted to be polled keeps its result ``result_expires``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import uuid4

import redis.asyncio as aioredis
from celery import Celery

from avatarchat.engines.llm.base import LLMError
from avatarchat.redact import redact_url

log = logging.getLogger(__name__)

TASK = "avatarchat.llm_chat"
QUEUE = "avatarchat-llm"
RESULT_KEY = "celery-task-meta-"  # + task id: the Redis backend's result key and channel
WORKER_KEY = "avatarchat:llm:worker"  # JSON {"hostname", "pid", "id"} of the last worker that beat
CALL_KEY = "avatarchat:llm:task:"  # + task id: RUNNING + worker id, ABANDONED, or the JSON outcome
RUNNING, ABANDONED = "running:", "abandoned"
LIVENESS_CACHE_S = 1.0
_TASK_ID = re.compile(r"[0-9a-f-]{36}")


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached, or no Celery worker is alive: the caller falls back to another mode."""


def worker_key(worker_id: str) -> str:
    return f"{WORKER_KEY}:{worker_id}"


def call_key_ttl_ms(timeout_s: float) -> int:
    """How long a call's claim outlives it: past its message's expiry, so no late copy runs it again."""
    return int((2 * timeout_s + 60) * 1000)


def make_celery(redis_url: str) -> Celery:
    app = Celery("avatarchat", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        # At most once, acked on receipt: a call's caller retries it (fallback) when its worker or Redis
        # is lost, so a redelivered copy would only run it twice. And with late acks Celery 5.7.0's worker
        # exits ("Unrecoverable error: AttributeError ... 'hostname'") when Redis goes away during a task:
        # its consumer closes the broken connection after collect(), and restoring the unacked message
        # then finds the transport gone (tests/test_llm_recovery.py, test_worker_survives_redis_dying_mid_call).
        task_acks_late=False,
        # Only late-acked tasks are cancelled (none here); set so Celery 6's default changes nothing.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,  # tasks submitted to be polled (POST /api/llm/tasks)
        broker_connection_retry_on_startup=True,
        # After Redis restarts the worker reconnects, however long it was away (the default gives up
        # after 100 tries and the worker exits).
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_transport_options={"socket_connect_timeout": 1, "socket_timeout": 5, "max_retries": 0},
        redis_socket_connect_timeout=1,
        redis_socket_timeout=5,
    )
    return app


def decode_result(raw: bytes | str) -> dict[str, Any]:
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise LLMError("task queue sent an unexpected result")
    return meta


def result_text(meta: dict[str, Any]) -> str:
    if meta.get("status") == "SUCCESS":
        return str(meta.get("result"))
    result = meta.get("result") or {}
    message = result.get("exc_message") if isinstance(result, dict) else result
    if isinstance(message, list | tuple):
        message = " ".join(str(m) for m in message)
    raise LLMError(str(message or f"task ended in state {meta.get('status')}"))


class QueueClient:
    """Submit chat tasks and await their results; one per process, bound to one event loop."""

    def __init__(self, redis_url: str, worker_timeout_s: float = 5.0) -> None:
        self.redis_url = redis_url
        self.shown_url = redact_url(redis_url)
        self.worker_timeout_s = worker_timeout_s
        self._celery = make_celery(redis_url)
        self._redis = aioredis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=None)
        # Publishing through kombu blocks; a small pool keeps it off the event loop.
        self._submitter = ThreadPoolExecutor(4, thread_name_prefix="celery-submit")
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._worker_seen: tuple[float, dict[str, Any]] | None = None  # (when, what), see worker()
        self._abandoning: set[asyncio.Task[None]] = set()

    def _unavailable(self, what: str, e: BaseException) -> QueueUnavailable:
        return QueueUnavailable(redact_url(f"{what} at {self.shown_url}: {type(e).__name__}: {e}"))

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self._redis.ping(), 1.5)
        except Exception as e:
            raise self._unavailable("Redis unreachable", e) from e

    async def worker(self) -> dict[str, Any]:
        """``{"alive": bool, ...}``: whether a Celery worker beat within ``worker_timeout_s``; cached for
        ``LIVENESS_CACHE_S`` (QueueUnavailable if Redis does not answer)."""
        now = time.monotonic()
        if self._worker_seen is not None and now - self._worker_seen[0] < LIVENESS_CACHE_S:
            return self._worker_seen[1]
        try:
            raw = await asyncio.wait_for(self._redis.get(WORKER_KEY), 1.5)
        except Exception as e:
            raise self._unavailable("Redis unreachable", e) from e
        seen: dict[str, Any] = {"alive": raw is not None}
        if raw is not None:
            seen["last_beat_by"] = json.loads(raw)
        else:
            seen["error"] = f"no live Celery worker (none beat in the last {self.worker_timeout_s:g} s)"
        self._worker_seen = (now, seen)
        return seen

    async def require_worker(self) -> None:
        seen = await self.worker()
        if not seen["alive"]:
            raise QueueUnavailable(seen["error"])

    async def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._subscribed = asyncio.get_running_loop().create_future()
            self._listener = asyncio.create_task(self._listen(self._subscribed), name="celery-results")
        assert self._subscribed is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._subscribed), 3)
        except Exception as e:
            raise self._unavailable("cannot subscribe to results", e) from e

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.psubscribe(RESULT_KEY + "*")
            subscribed.set_result(None)
            async for message in pubsub.listen():
                if message.get("type") != "pmessage":
                    continue
                task_id = message["channel"].decode()[len(RESULT_KEY):]
                fut = self._waiters.get(task_id)
                if fut is not None and not fut.done():
                    try:
                        fut.set_result(decode_result(message["data"]))
                    except Exception as e:
                        fut.set_exception(e)
        except Exception as e:
            if not subscribed.done():
                subscribed.set_exception(e)
            log.warning("task-queue result subscription lost", extra={"error": redact_url(f"{type(e).__name__}: {e}")})
            for fut in self._waiters.values():  # the callers fall back and retry the call another way
                if not fut.done():
                    fut.set_exception(self._unavailable("lost the result subscription", e))
        finally:
            await pubsub.aclose()

    async def _send(self, task_id: str, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                    waited: float | None = None) -> None:
        """Publish the task; ``waited``: the caller waits this long for its outcome, then nobody does."""
        def publish() -> None:
            self._celery.send_task(TASK, args=[messages, max_tokens, temperature], kwargs={"publish": waited is not None},
                                   task_id=task_id, expires=waited, ignore_result=waited is not None, retry=False)

        try:
            await asyncio.get_running_loop().run_in_executor(self._submitter, publish)
        except Exception as e:
            raise self._unavailable("cannot submit", e) from e

    async def submit(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        """Queue a chat task and return its id at once (read it with ``status``); QueueUnavailable when
        no worker is alive to run it."""
        await self.require_worker()
        task_id = str(uuid4())
        await self._send(task_id, messages, max_tokens, temperature)
        return task_id

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, timeout: float) -> str:
        """Run one chat as a task and return its text (LLMError if it failed, QueueUnavailable if Redis or
        the worker did)."""
        await self._ensure_listener()
        # Register the waiter before the task can finish: the id is made here, not by the broker.
        task_id = str(uuid4())
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = fut
        published = False
        try:
            # Past its timeout nobody waits for the call: a worker that gets it later drops it.
            await self._send(task_id, messages, max_tokens, temperature, waited=timeout)
            published = True
            meta = await self._wait(task_id, fut, timeout)
        except BaseException as e:  # timed out, worker or Redis gone, or the caller cancelled (even mid-send)
            if published or not isinstance(e, QueueUnavailable):
                abandon = asyncio.create_task(self._abandon(task_id, timeout))
                self._abandoning.add(abandon)
                abandon.add_done_callback(self._abandoning.discard)
                await asyncio.shield(abandon)  # marked even when the caller is cancelled
            raise
        finally:
            self._waiters.pop(task_id, None)
        return result_text(meta)

    async def _wait(self, task_id: str, fut: asyncio.Future[dict[str, Any]], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            done, _ = await asyncio.wait({fut}, timeout=min(deadline - time.monotonic(), LIVENESS_CACHE_S))
            if done:
                return fut.result()
            if time.monotonic() >= deadline:
                raise LLMError(f"the task queue gave no answer within {timeout:g} s")
            # A worker that died with the call would leave it waiting for the whole timeout.
            seen = await self.worker()
            if not seen["alive"]:
                raise QueueUnavailable(f"{seen['error']}: the call was given up")
            if (gone := await self._runner_gone(task_id)) is not None:
                raise QueueUnavailable(f"the Celery worker running the call ({gone}) stopped: the call was given up")

    async def _runner_gone(self, task_id: str) -> str | None:
        """The id of the worker that took the call, if it no longer beats (None: it does, or none took it)."""
        try:
            raw = await asyncio.wait_for(self._redis.get(CALL_KEY + task_id), 1.5)
            state = raw.decode() if isinstance(raw, bytes) else raw
            if state is None or not state.startswith(RUNNING):
                return None
            runner = state[len(RUNNING):]
            return None if await asyncio.wait_for(self._redis.exists(worker_key(runner)), 1.5) else runner
        except Exception as e:
            raise self._unavailable("Redis unreachable", e) from e

    async def _abandon(self, task_id: str, timeout: float) -> None:
        """Mark a call nobody waits for: a worker that has not run it skips it, one running it publishes nothing."""
        try:
            await asyncio.wait_for(self._redis.set(CALL_KEY + task_id, ABANDONED, px=call_key_ttl_ms(timeout)), 1.5)
        except Exception as e:  # Redis is gone: the message's expiry still stops a late run
            log.info("could not mark an abandoned LLM task", extra={"task": task_id,
                                                                   "error": redact_url(f"{type(e).__name__}: {e}")})

    async def status(self, task_id: str) -> dict[str, Any]:
        if not _TASK_ID.fullmatch(task_id):
            raise ValueError("not a task id")
        try:
            raw = await asyncio.wait_for(self._redis.get(RESULT_KEY + task_id), 3)
        except Exception as e:
            raise self._unavailable("Redis unreachable", e) from e
        if raw is None:
            return {"id": task_id, "status": "PENDING"}
        meta = decode_result(raw)
        out: dict[str, Any] = {"id": task_id, "status": meta.get("status")}
        try:
            out["result"] = result_text(meta)
        except LLMError as e:
            out["error"] = str(e)
        return out

    async def close(self) -> None:
        if self._abandoning:
            await asyncio.gather(*self._abandoning, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._redis.aclose()
        self._submitter.shutdown(wait=False, cancel_futures=True)
