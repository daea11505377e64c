"""The gateway's read-only avatar routes, relayed as they are.

List, preview and the TTS voices are GETs whose answer the gateway does not need to understand: their
status, type and body are streamed from the avatar service to the client. This skips FastAPI's parameter
and response handling and a JSON decode and re-encode per call, which were most of the gateway's CPU per
forwarded request (bench/forwarding). Errors are the same JSON errors the other avatar routes give.
"""

from __future__ import annotations

import logging

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from avatarchat.server.avatar_api import service_error
from avatarchat.services.avatar_client import AvatarServiceError, HttpAvatarService

log = logging.getLogger(__name__)
RELAYED = ("/api/avatar/list", "/api/avatar/preview", "/api/tts/models")
_KEPT = (b"content-type", b"content-length", b"cache-control", b"etag", b"last-modified")


class Relay:
    """An ASGI app that answers one GET route with the avatar service's answer to the same request."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service: HttpAvatarService = scope["app"].state.avatar_service
        try:
            response = await service.relay(self.path, scope["query_string"])
        except AvatarServiceError as e:
            await (await service_error(Request(scope), e))(scope, receive, send)
            return
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() in _KEPT]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            last = b""  # held back one chunk, so that the final one ends the body (one write fewer)
            async for chunk in response.aiter_raw():
                if last:
                    await send({"type": "http.response.body", "body": last, "more_body": True})
                last = chunk
            await send({"type": "http.response.body", "body": last})
        except httpx.HTTPError as e:
            # The answer has begun: its status can't change. The server closes the connection short of
            # the announced length, so the client sees the body is incomplete.
            log.warning("relay of %s broke off: %s: %s", self.path, type(e).__name__, e)
        finally:
            await response.aclose()


class RelayMiddleware:
    """Answers the relayed GETs before FastAPI's exception handling and routing, which cost about as much
    CPU again as the relay itself. Every other request goes on to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._relays = {path: Relay(path) for path in RELAYED}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            relay = self._relays.get(scope["path"])
            if relay is not None:
                await relay(scope, receive, send)
                return
        await self.app(scope, receive, send)
