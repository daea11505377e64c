"""The Celery worker's side of queue mode: ``celery -A avatarchat.services.llm_tasks worker -P threads``.

The worker reads the same config (``$AVATARCHAT_CONFIG`` and the environment) as the server, so the
LLM server's address and key stay out of the task messages. It beats (``WORKER_KEY``) while its consumer
is connected, and runs the LLM at most once per task id (services/llm_queue.py says why).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, ClassVar

import redis
from celery import Task, bootsteps
from celery.exceptions import Ignore
from celery.signals import after_setup_logger, after_setup_task_logger

from avatarchat.config import load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.logs import RedactingFormatter
from avatarchat.services.llm_exec import SyncChannel
from avatarchat.services.llm_queue import (
    ABANDONED,
    CALL_KEY,
    RESULT_KEY,
    RUNNING,
    TASK,
    WORKER_KEY,
    call_key_ttl_ms,
    make_celery,
    worker_key,
)

log = logging.getLogger(__name__)
settings = load_settings()
config = settings.services.llm
app = make_celery(config.redis_url)
_channel = SyncChannel(settings.llm.openai, config)
_redis = redis.Redis.from_url(config.redis_url, socket_connect_timeout=1, socket_timeout=5)
_ttl_ms = call_key_ttl_ms(config.timeout_s)
# Made on import, so the children of a forking pool name their parent, the process that beats.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
# The outcome is kept unless the caller gave the call up meanwhile (then it is not published either).
_finish = _redis.register_script("""
if redis.call('GET', KEYS[1]) == ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
""")


class Heartbeat(bootsteps.StartStopStep):
    """Writes WORKER_KEY and this worker's own key from the consumer's event loop: a worker that died,
    hangs or lost Redis stops beating, and the keys expire ``worker_timeout_s`` after its last beat."""

    requires: ClassVar[set[str]] = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.value = json.dumps({"hostname": getattr(parent, "hostname", None) or socket.gethostname(),
                                 "pid": os.getpid(), "id": WORKER_ID})

    def start(self, parent: Any) -> None:
        self.beat()
        self.tref = parent.timer.call_repeatedly(config.worker_timeout_s / 5, self.beat, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop

    def beat(self) -> None:
        ttl_ms = int(config.worker_timeout_s * 1000)
        pipe = _redis.pipeline(transaction=False)
        pipe.set(WORKER_KEY, self.value, px=ttl_ms)
        pipe.set(worker_key(WORKER_ID), 1, px=ttl_ms)
        try:
            pipe.execute()
        except redis.RedisError as e:  # the consumer reconnects (and restarts this step) on its own
            log.warning("worker heartbeat not written: %s: %s", type(e).__name__, e)


app.steps["consumer"].add(Heartbeat)


@app.task(name=TASK, bind=True)
def llm_chat(self: Task, messages: list[dict[str, str]], max_tokens: int, temperature: float,
             publish: bool = False) -> str:
    """One chat call. With ``publish`` (a waited call, sent with ignore_result) the outcome is only
    published to its waiting caller, never stored: when the caller has gone, nothing is kept."""
    task_id = str(self.request.id)
    try:
        reply = _chat_once(task_id, messages, max_tokens, temperature)
    except Ignore:
        raise
    except Exception as e:
        if publish:
            _publish(task_id, {"status": "FAILURE", "result": {"exc_type": type(e).__name__, "exc_message": [str(e)]}})
        raise
    if publish:
        _publish(task_id, {"status": "SUCCESS", "result": reply})
    return reply


def _publish(task_id: str, meta: dict[str, Any]) -> None:
    try:
        _redis.publish(RESULT_KEY + task_id, json.dumps({**meta, "task_id": task_id}))
    except redis.RedisError as e:  # Redis is away: so is the caller's subscription, it has given up the call
        log.warning("LLM task outcome not published: %s: %s", type(e).__name__, e)


def _chat_once(task_id: str, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
    key = CALL_KEY + task_id
    if not _redis.set(key, RUNNING + WORKER_ID, nx=True, px=_ttl_ms):
        return _again(key)
    try:
        reply = _channel.chat(messages, max_tokens, temperature)
    except LLMError as e:
        if not _record(key, {"error": str(e)}):
            raise Ignore() from e
        raise
    if not _record(key, {"reply": reply}):
        raise Ignore()
    return reply


def _record(key: str, outcome: dict[str, str]) -> bool:
    """Keep a call's outcome for a later copy of it; False if its caller gave it up."""
    try:
        return bool(_finish(keys=[key], args=[json.dumps(outcome), ABANDONED, _ttl_ms]))
    except redis.RedisError as e:  # the outcome still goes to a caller that waits; a later copy skips the call
        log.warning("LLM task outcome not recorded: %s: %s", type(e).__name__, e)
        return True


def _again(key: str) -> str:
    """A task id seen before (a second delivery, or a call its caller abandoned): never a second LLM call."""
    raw = _redis.get(key)
    state = raw.decode() if isinstance(raw, bytes) else raw
    if state is not None and state != ABANDONED and not state.startswith(RUNNING):
        outcome = json.loads(state)
        if "error" in outcome:
            raise LLMError(outcome["error"])
        return str(outcome["reply"])
    log.info("LLM task skipped: %s", "its caller gave it up" if state == ABANDONED else "it runs already")
    raise Ignore()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redacted_logs(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter()))
