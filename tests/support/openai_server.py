"""A small OpenAI-compatible chat server for tests, on loopback, whose behaviour tests control.

It echoes a scripted reply word by word as SSE. ``Behaviour`` fields set latency, errors, stalls and
mid-stream drops. Requests are recorded for assertions.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Behaviour:
    reply: str = "Hello there. I am a test server, and I answer quickly!"
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    status: int = 200
    drop_after_tokens: int | None = None  # close the stream abruptly after this many tokens
    error_frame: str | None = None  # send an SSE error object instead of content
    retry_after: str | None = None  # Retry-After header on error statuses
    fail_first: int = 0  # the first N chat requests get `fail_status`, later ones succeed
    fail_status: int = 503
    stall_after_tokens: int | None = None  # stop sending (without closing) after this many tokens
    api_key: str | None = None  # if set, other keys get 401
    models: list[str] | None = None  # ids GET /v1/models lists
    raw_data: list[str] | None = None  # SSE data payloads sent as they are, instead of the reply
    keepalive_forever: bool = False  # only keep-alive comments, never content
    headers_delay_s: float = 0.0  # before the response headers
    models_status: int = 200  # GET /v1/models answers this (an error body unless 200)
    models_delay_s: float = 0.0  # before GET /v1/models answers
    models_gate: threading.Event | None = None  # GET /v1/models answers once this is set (waits at most 60 s)


@dataclass
class OpenAITestServer:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    models_requests: int = 0  # GET /v1/models requests received
    in_flight: int = 0  # streams being sent now
    peak_in_flight: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _app(self) -> Starlette:
        async def models(request: Request) -> Response:
            b = self.behaviour
            self.models_requests += 1
            if b.models_gate is not None:
                await asyncio.to_thread(b.models_gate.wait, 60)
            await asyncio.sleep(b.models_delay_s)
            if b.api_key is not None and request.headers.get("authorization") != f"Bearer {b.api_key}":
                return JSONResponse({"error": {"message": "invalid api key", "type": "auth"}}, status_code=401)
            if b.models_status != 200:
                return JSONResponse({"error": {"message": f"test error {b.models_status}", "type": "test"}},
                                    status_code=b.models_status)
            ids = b.models if b.models is not None else ["test-model"]
            return JSONResponse({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append({"body": body, "headers": dict(request.headers)})
            b = self.behaviour
            headers = {"retry-after": b.retry_after} if b.retry_after is not None else None
            if b.api_key is not None and request.headers.get("authorization") != f"Bearer {b.api_key}":
                return JSONResponse({"error": {"message": "invalid api key", "type": "auth"}}, status_code=401)
            if b.fail_first > 0:
                b.fail_first -= 1
                return JSONResponse({"error": {"message": f"test error {b.fail_status}", "type": "test"}},
                                    status_code=b.fail_status, headers=headers)
            if b.status != 200:
                return JSONResponse({"error": {"message": f"test error {b.status}", "type": "test"}}, status_code=b.status,
                                    headers=headers)
            words = [w + " " for w in b.reply.split(" ")]
            words[-1] = words[-1].rstrip()

            def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
                chunk = {"id": "t", "object": "chat.completion.chunk", "created": int(time.time()), "model": "test-model",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(chunk)}\n\n".encode()

            if not body.get("stream"):
                await asyncio.sleep(b.first_token_delay_s)
                return JSONResponse({"id": "t", "object": "chat.completion", "created": int(time.time()),
                                     "model": body.get("model", "test-model"),
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": b.reply},
                                                  "finish_reason": "stop"}]})

            await asyncio.sleep(b.headers_delay_s)

            async def gen() -> Any:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    async for part in stream():
                        yield part
                finally:
                    self.in_flight -= 1

            async def stream() -> Any:
                await asyncio.sleep(b.first_token_delay_s)
                yield b": keep-alive\n\n"
                yield frame({"role": "assistant"})
                while b.keepalive_forever:
                    await asyncio.sleep(0.05)
                    yield b": keep-alive\n\n"
                if b.raw_data is not None:
                    for data in b.raw_data:
                        yield f"data: {data}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
                if b.error_frame:
                    yield f"data: {json.dumps({'error': {'message': b.error_frame}})}\n\n".encode()
                    return
                for i, w in enumerate(words):
                    if b.drop_after_tokens is not None and i >= b.drop_after_tokens:
                        raise ConnectionError("dropped on purpose")
                    if b.stall_after_tokens is not None and i >= b.stall_after_tokens:
                        await asyncio.sleep(3600)
                    yield frame({"content": w})
                    await asyncio.sleep(b.token_delay_s)
                yield frame({}, "stop")
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])

    def start(self) -> OpenAITestServer:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without it a
        # keep-alive request waited ~40 ms (Nagle against the client's delayed ACK) for its response's body.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
