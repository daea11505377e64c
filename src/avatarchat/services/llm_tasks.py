"""The Celery worker's side of queue mode: ``celery -A avatarchat.services.llm_tasks worker -P threads``.

The worker reads the same config (``$AVATARCHAT_CONFIG`` and the environment) as the server, so the
LLM server's address and key stay out of the task messages.
"""

from __future__ import annotations

from avatarchat.config import load_settings
from avatarchat.services.llm_exec import SyncChannel
from avatarchat.services.llm_queue import TASK, make_celery

settings = load_settings()
app = make_celery(settings.services.llm.redis_url)
_channel = SyncChannel(settings.llm.openai, settings.services.llm)


@app.task(name=TASK)
def llm_chat(messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
    return _channel.chat(messages, max_tokens, temperature)
