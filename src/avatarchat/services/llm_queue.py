"""Queue mode: LLM calls as Celery tasks, Redis as broker and result backend.

The worker side is ``avatarchat.services.llm_tasks`` (``celery -A avatarchat.services.llm_tasks worker``).
This side submits by task name and waits without polling: Celery's Redis backend publishes every
result on the channel ``celery-task-meta-<id>``, and one pattern subscription per process hands each
result to the coroutine waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import uuid4

import redis.asyncio as aioredis
from celery import Celery

from avatarchat.engines.llm.base import LLMError

log = logging.getLogger(__name__)

TASK = "avatarchat.llm_chat"
QUEUE = "avatarchat-llm"
_META = "celery-task-meta-"
_TASK_ID = re.compile(r"[0-9a-f-]{36}")


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached: the caller falls back to another mode."""


def make_celery(redis_url: str) -> Celery:
    app = Celery("avatarchat", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,  # a task a dying worker held is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
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

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._celery = make_celery(redis_url)
        self._redis = aioredis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=None)
        # Publishing through kombu blocks; a small pool keeps it off the event loop.
        self._submitter = ThreadPoolExecutor(4, thread_name_prefix="celery-submit")
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self._redis.ping(), 1.5)
        except Exception as e:
            raise QueueUnavailable(f"Redis at {self.redis_url} unreachable: {type(e).__name__}: {e}") from e

    async def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._subscribed = asyncio.get_running_loop().create_future()
            self._listener = asyncio.create_task(self._listen(self._subscribed), name="celery-results")
        assert self._subscribed is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._subscribed), 3)
        except Exception as e:
            raise QueueUnavailable(f"cannot subscribe to results at {self.redis_url}: {type(e).__name__}: {e}") from e

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.psubscribe(_META + "*")
            subscribed.set_result(None)
            async for message in pubsub.listen():
                if message.get("type") != "pmessage":
                    continue
                task_id = message["channel"].decode()[len(_META):]
                fut = self._waiters.get(task_id)
                if fut is not None and not fut.done():
                    try:
                        fut.set_result(decode_result(message["data"]))
                    except Exception as e:
                        fut.set_exception(e)
        except Exception as e:
            if not subscribed.done():
                subscribed.set_exception(e)
            log.warning("task-queue result subscription lost", extra={"error": f"{type(e).__name__}: {e}"})
            for fut in self._waiters.values():  # the callers fall back and retry the call another way
                if not fut.done():
                    fut.set_exception(QueueUnavailable(f"lost the Redis result subscription: {e}"))
        finally:
            await pubsub.aclose()

    async def _send(self, task_id: str, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> None:
        def publish() -> None:
            self._celery.send_task(TASK, args=[messages, max_tokens, temperature], task_id=task_id, retry=False)

        try:
            await asyncio.get_running_loop().run_in_executor(self._submitter, publish)
        except Exception as e:
            raise QueueUnavailable(f"cannot submit to {self.redis_url}: {type(e).__name__}: {e}") from e

    async def submit(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        """Queue a chat task and return its id at once (read it with ``status``)."""
        await self.ping()
        task_id = str(uuid4())
        await self._send(task_id, messages, max_tokens, temperature)
        return task_id

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, timeout: float) -> str:
        """Run one chat as a task and return its text (LLMError if it failed, QueueUnavailable if Redis is)."""
        await self._ensure_listener()
        # Register the waiter before the task can finish: the id is made here, not by the broker.
        task_id = str(uuid4())
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = fut
        try:
            await self._send(task_id, messages, max_tokens, temperature)
            try:
                meta = await asyncio.wait_for(fut, timeout)
            except TimeoutError as e:
                raise LLMError(f"the task queue gave no answer within {timeout:g} s") from e
            return result_text(meta)
        finally:
            self._waiters.pop(task_id, None)

    async def status(self, task_id: str) -> dict[str, Any]:
        if not _TASK_ID.fullmatch(task_id):
            raise ValueError("not a task id")
        try:
            raw = await asyncio.wait_for(self._redis.get(_META + task_id), 3)
        except Exception as e:
            raise QueueUnavailable(f"Redis at {self.redis_url} unreachable: {type(e).__name__}: {e}") from e
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
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._redis.aclose()
        self._submitter.shutdown(wait=False, cancel_futures=True)
