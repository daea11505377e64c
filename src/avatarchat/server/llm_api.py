"""LLM calls through the execution modes (seed 001), Celery task endpoints, and the admin switches."""

from __future__ import annotations

import hmac
import ipaddress
import math
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from avatarchat.config import ConfigError, load_settings
from avatarchat.engines.llm.base import LLMError
from avatarchat.services.llm_exec import LLMExecutor, LLMUnavailable

router = APIRouter()
_MAX_CHARS = 32_000


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=_MAX_CHARS)


class ChatBody(BaseModel):
    messages: list[Message] = Field(min_length=1, max_length=64)
    # Strict: "temperature": false or "max_tokens": "9" is a client's mistake, not 0.0 or 9 (as the schema says).
    max_tokens: int | None = Field(None, ge=1, le=8192, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True, allow_inf_nan=False)  # NaN: "finite number"

    def plain(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class ModeBody(BaseModel):
    mode: Literal["asyncio", "threads", "queue"]


def _llm(request: Request) -> LLMExecutor:
    return request.app.state.llm_exec  # type: ignore[no-any-return]


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


@router.post("/api/llm/chat")
async def chat(request: Request, body: ChatBody, response: Response) -> dict[str, Any]:
    llm = _llm(request)
    mode = llm.mode
    try:
        reply = await llm.reply(body.plain(), max_tokens=body.max_tokens, temperature=body.temperature)
    except LLMUnavailable as e:
        raise HTTPException(503, str(e), headers=_retry_after(e.retry_after_s)) from e
    except LLMError as e:
        raise HTTPException(502, str(e)) from e
    out: dict[str, Any] = {"reply": reply.text, "mode": mode}
    if reply.fallback is not None:
        out["fallback"] = {"mode": reply.mode, "reason": reply.fallback}
        response.headers["X-LLM-Fallback"] = reply.mode
    return out


@router.post("/api/llm/tasks", status_code=202)
async def submit(request: Request, body: ChatBody) -> dict[str, Any]:
    from avatarchat.services.llm_queue import QueueUnavailable

    try:
        task_id = await _llm(request).submit(body.plain(), max_tokens=body.max_tokens, temperature=body.temperature)
    except QueueUnavailable as e:
        retry = _retry_after(request.app.state.settings.services.llm.redis_retry_s)
        raise HTTPException(503, f"task queue unavailable: {e}", headers=retry) from e
    return {"id": task_id, "status": "PENDING", "status_url": f"/api/llm/tasks/{task_id}"}


@router.get("/api/llm/tasks/{task_id}")
async def task_status(request: Request, task_id: str) -> dict[str, Any]:
    from avatarchat.services.llm_queue import QueueUnavailable

    try:
        return await _llm(request).task_status(task_id)
    except ValueError as e:
        raise HTTPException(400, f"{task_id!r} is not a task id") from e
    except QueueUnavailable as e:
        raise HTTPException(503, f"task queue unavailable: {e}") from e


def _admin(request: Request) -> None:
    token = request.app.state.settings.services.admin_token.get_secret_value()
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "admin endpoints need the admin token (Authorization: Bearer …)")
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise HTTPException(403, "admin endpoints answer loopback clients only (or set services.admin_token)")


@router.get("/admin/llm-mode")
async def get_mode(request: Request) -> dict[str, Any]:
    _admin(request)
    return _llm(request).status()


@router.post("/admin/llm-mode")
async def set_mode(request: Request, body: ModeBody) -> dict[str, Any]:
    _admin(request)
    _llm(request).set_mode(body.mode)
    return _llm(request).status()


@router.post("/admin/reload")
async def reload(request: Request) -> dict[str, Any]:
    """Re-read the config file and the environment; apply what can change at run time (the LLM mode)."""
    _admin(request)
    try:
        fresh = load_settings(request.app.state.config_path)
    except ConfigError as e:
        raise HTTPException(400, f"config not reloaded: {e}") from e
    _llm(request).apply(fresh.services.llm)
    request.app.state.settings.services.llm = fresh.services.llm
    return {"reloaded": True, "llm": _llm(request).status()}
