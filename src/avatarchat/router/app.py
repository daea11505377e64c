"""HTTP endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, and the admin API (bearer token).

Errors are OpenAI-style bodies: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from avatarchat.router import sse
from avatarchat.router.config import RouterConfigError
from avatarchat.router.executor import Committed, RouteError, relay
from avatarchat.router.query import QueryError, StrategyError
from avatarchat.router.service import Router

log = logging.getLogger("avatarchat.router")
Getter = Callable[[], "Router | None"]


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(sse.error_body(message, type_, code, param), status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body of {declared} bytes is over the {limit}-byte limit", code="body_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ClientError(413, f"request body is over the {limit}-byte limit", code="body_too_large")
    if not raw:
        raise ClientError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object", code="invalid_json")
    return body


def validate_chat(body: dict[str, Any], max_messages: int) -> None:
    model = body.get("model")
    if model is None:
        raise ClientError(400, "you must provide a model parameter", "model", "missing_model")
    if not isinstance(model, str) or not model.strip():
        raise ClientError(400, "'model' must be a non-empty string", "model", "invalid_model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ClientError(400, "'messages' must be a non-empty array", "messages", "invalid_messages")
    if len(msgs) > max_messages:
        raise ClientError(400, f"{len(msgs)} messages is over the limit of {max_messages}", "messages", "too_many_messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ClientError(400, f"messages[{i}] must be an object with a string 'role'", f"messages.{i}", "invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ClientError(400, "'stream' must be true or false", "stream", "invalid_stream")


def router_routes(get: Getter, admin_prefix: str = "/admin") -> list[BaseRoute]:
    """The router's routes; ``get`` returns the live Router (None while it is starting)."""

    def live() -> Router:
        r = get()
        if r is None:
            raise ClientError(503, "the router is still starting", code="not_ready")
        return r

    async def chat(request: Request) -> Response:
        try:
            router = live()
            limits = router.state.config.limits
            body = await _read_body(request, limits.max_body_bytes)
            validate_chat(body, limits.max_messages)
            strategy, strategy_field = body.pop("router_strategy", None), "router_strategy"
            if not strategy:
                strategy, strategy_field = request.headers.get("x-router-strategy"), "x-router-strategy"
            result, cand, attempts = await router.chat(body, strategy)
        except ClientError as e:
            return error(e.status, e.message, code=e.code, param=e.param)
        except StrategyError as e:
            return error(400, str(e), code="invalid_strategy", param=strategy_field)
        except QueryError as e:
            return error(400, str(e), code="invalid_model", param="model")
        except RouteError as e:
            return _route_error(e)
        headers = {"x-router-channel": cand.entry.channel, "x-router-model": cand.entry.model,
                   "x-router-attempts": str(len(attempts))}
        if isinstance(result, Committed):
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            return _RelayResponse(result, relay(result, router.state.config.retry.stall_timeout_s),
                                  media_type="text/event-stream", headers=headers)
        return Response(result, media_type="application/json", headers=headers)

    cache: dict[str, Any] = {}

    async def models(request: Request) -> Response:
        try:
            router = live()
        except ClientError as e:
            return error(e.status, e.message, code=e.code)
        s = router.state
        key = f"{s.generation}:{s.index.version}"
        if cache.get("key") != key:
            ids = list(s.config.aliases) + s.index.model_ids()
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "avatarchat-router"} for m in ids]
            cache["key"], cache["body"] = key, json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        return Response(cache["body"], media_type="application/json")

    def admin(handler: Callable[[Request, Router], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                router = live()
            except ClientError as e:
                return error(e.status, e.message, code=e.code)
            env = router.state.config.admin.token_env
            token = os.environ.get(env, "")
            if not token:
                return error(503, f"admin API disabled: set ${env} to a bearer token", "server_error", "admin_disabled")
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error(401, "admin endpoints need 'Authorization: Bearer <token>'", "authentication_error",
                             "invalid_admin_token", headers={"www-authenticate": "Bearer"})
            try:
                return await handler(request, router)
            except ClientError as e:
                return error(e.status, e.message, code=e.code, param=e.param)
            except QueryError as e:
                return error(400, str(e), code="invalid_model", param="model")

        return wrapped

    async def channels(request: Request, router: Router) -> Response:
        return JSONResponse({"channels": router.channels(), "stats": router.stats()})

    async def stats(request: Request, router: Router) -> Response:
        return JSONResponse(router.stats())

    async def explain(request: Request, router: Router) -> Response:
        strategy_field = "strategy"
        if request.method == "POST":
            body = await _read_body(request, router.state.config.limits.max_body_bytes)
            model, strategy = body.get("model"), body.get("strategy")
            if not strategy:
                strategy, strategy_field = body.get("router_strategy"), "router_strategy"
        else:
            model, strategy = request.query_params.get("model"), request.query_params.get("strategy")
        if not isinstance(model, str) or not model:
            raise ClientError(400, "explain needs a 'model' (query parameter or JSON field)", "model", "missing_model")
        try:
            return JSONResponse(router.explain(model, strategy))
        except StrategyError as e:
            raise ClientError(400, str(e), strategy_field, "invalid_strategy") from None

    async def reload(request: Request, router: Router) -> Response:
        try:
            info = await router.reload()
        except RouterConfigError as e:
            log.error("router config rejected; the running config stays in force", extra={"error": str(e)})
            return error(400, f"config rejected, the running config stays in force: {e}", code="invalid_config")
        return JSONResponse({"reloaded": True, **info})

    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route(f"{admin_prefix}/channels", admin(channels), methods=["GET"]),
        Route(f"{admin_prefix}/stats", admin(stats), methods=["GET"]),
        Route(f"{admin_prefix}/explain", admin(explain), methods=["GET", "POST"]),
        Route(f"{admin_prefix}/reload", admin(reload), methods=["POST"]),
    ]


class _RelayResponse(StreamingResponse):
    """A stream response that releases its upstream even if the caller leaves before the first byte."""

    def __init__(self, committed: Committed, content: AsyncIterator[bytes], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._committed = committed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._committed.abandon()


def _route_error(e: RouteError) -> Response:
    headers = {"retry-after": str(max(1, round(e.retry_after)))} if e.retry_after else None
    if e.body:
        try:
            obj = json.loads(e.body)
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                return JSONResponse(obj, status_code=e.status, headers=headers)
        except ValueError:
            pass
    return error(e.status, e.message, e.type, e.code, headers=headers)


def create_app(router: Router) -> Starlette:
    """The standalone router app; starts the router's background work and SIGHUP reload."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        router.install_sighup()
        try:
            yield
        finally:
            await router.close()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        s = router.state
        return JSONResponse({"ready": True, "entries": len(s.index.entries), "index_complete": s.index.complete.is_set()})

    routes = router_routes(lambda: router) + [Route("/health", health), Route("/ready", ready)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.router = router
    return app
