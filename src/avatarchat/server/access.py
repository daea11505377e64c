"""Who may use what (issue 14): the WebSocket's allowed origins, an optional API token for the public write
APIs, and the open read-only endpoints a deployment may close.

Open by default, as a local app is: the page, ``/ws`` (same origin or loopback), ``/health``, ``/ready``,
the avatar list, previews, idle clips and the TTS voices. With ``server.api_token`` set, the write APIs
(avatar add/delete/start, ``/api/llm/*``, WebRTC signalling) need ``Authorization: Bearer <token>``.
``/metrics``, ``/api/monitor`` and the API docs (``/docs``, ``/redoc``, ``/openapi.json``) are each
``open``, ``token`` (the same bearer token) or ``off`` (404) by ``server.endpoints``.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from avatarchat.config import ServerConfig

WRITE_PREFIXES = ("/api/avatar/add", "/api/avatar/delete", "/api/avatar/start", "/api/llm/", "/api/webrtc/")
_READ_ONLY = {"metrics": ("/metrics",), "monitor": ("/api/monitor",), "docs": ("/docs", "/redoc", "/openapi.json")}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """A browser always sends Origin on a WebSocket; a client without one is not a web page (no CSRF)."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if not parts.hostname:
        return False  # "null" (a sandboxed frame, a file:// page) and the like
    if host is not None and parts.netloc.lower() == host.lower():
        return True  # same origin
    return not allowed and _loopback(parts.hostname)


class AccessMiddleware:
    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        token = config.api_token.get_secret_value()
        self._expected = b"Bearer " + token.encode() if token else None
        self._modes = [(paths, getattr(config.endpoints, name)) for name, paths in _READ_ONLY.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            mode = next((m for paths, m in self._modes if path in paths), None)
            if mode == "off":
                await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
                return
            needs_token = mode == "token" or (self._expected is not None and path.startswith(WRITE_PREFIXES))
            if needs_token and not self._authorized(scope):
                await JSONResponse(
                    {"detail": "this endpoint needs Authorization: Bearer <server.api_token>"}
                    if self._expected is not None else {"detail": "this endpoint is closed: server.api_token is not set"},
                    status_code=401 if self._expected is not None else 403, headers={"www-authenticate": "Bearer"},
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._expected is None:
            return False
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)
