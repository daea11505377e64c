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


@dataclass
class OpenAITestServer:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "test-model", "object": "model"}]})

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append({"body": body, "headers": dict(request.headers)})
            b = self.behaviour
            if b.status != 200:
                return JSONResponse({"error": {"message": f"test error {b.status}", "type": "test"}}, status_code=b.status)
            words = [w + " " for w in b.reply.split(" ")]
            words[-1] = words[-1].rstrip()

            def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
                chunk = {"id": "t", "object": "chat.completion.chunk", "created": int(time.time()), "model": "test-model",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(chunk)}\n\n".encode()

            if not body.get("stream"):
                await asyncio.sleep(b.first_token_delay_s)  # the whole answer's latency
                return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": b.reply}}]})

            async def gen() -> Any:
                await asyncio.sleep(b.first_token_delay_s)
                yield b": keep-alive\n\n"
                yield frame({"role": "assistant"})
                if b.error_frame:
                    yield f"data: {json.dumps({'error': {'message': b.error_frame}})}\n\n".encode()
                    return
                for i, w in enumerate(words):
                    if b.drop_after_tokens is not None and i >= b.drop_after_tokens:
                        raise ConnectionError("dropped on purpose")
                    yield frame({"content": w})
                    await asyncio.sleep(b.token_delay_s)
                yield frame({}, "stop")
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])

    def start(self) -> OpenAITestServer:
        sock = socket.socket()
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
