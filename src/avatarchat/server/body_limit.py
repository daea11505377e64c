"""Request bodies are limited before they are read (issue 14).

FastAPI parses a multipart form whole, into a temporary file, before the route runs: a route can only check
the size of an upload that is already on disk. This middleware refuses a body by its Content-Length at once
and stops reading a streamed (chunked) body at the limit, with a 413 either way. Uploads get
``avatar.max_upload_bytes`` (plus room for the form's own fields); every other request ``server.max_body_bytes``.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_FORM_OVERHEAD = 64 * 1024  # multipart boundaries, the name field, headers of the parts


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, default: int, per_path: dict[str, int]) -> None:
        self.app = app
        self._default = default
        self._per_path = per_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._per_path.get(scope["path"], self._default)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(send, limit, "Content-Length" if declared.isdigit() else "a bad Content-Length")
            return
        seen = 0
        exceeded = started = False

        async def limited() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to a body cut short (FastAPI: 400 "error parsing the body"): ours instead
                if not started:
                    started = True
                    await _refuse(send, limit, "its body")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:
            if not started:  # the usual case: the body is read before any answer begins
                await _refuse(send, limit, "its body")


async def _refuse(send: Send, limit: int, what: str) -> None:
    body = json.dumps({"detail": f"request body is over the {limit}-byte limit ({what})"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def upload_limits(max_upload_bytes: int) -> dict[str, int]:
    return {"/api/avatar/add": max_upload_bytes + _FORM_OVERHEAD}
