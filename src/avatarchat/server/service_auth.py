"""The avatar service's shared secret with its gateways (``services.token``).

When it is set, role ``avatar`` answers ``/api/*`` (the avatar API, WebRTC signalling and the render API)
only to requests that carry ``Authorization: Bearer <token>``, which a gateway configured with the same
token sends on every call. Health, readiness and metrics stay open for probes.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class ServiceTokenMiddleware:
    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in")
        self.app = app
        self._expected = b"Bearer " + token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                response = JSONResponse(
                    {"detail": "this avatar service answers its gateways only: send Authorization: Bearer <services.token>"},
                    status_code=401, headers={"www-authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
