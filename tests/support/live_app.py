"""Run the real app (real models) in a background thread on a loopback port, for end-to-end tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from avatarchat.config import Settings
from avatarchat.server.app import create_app
from avatarchat.server.serving import uvicorn_options

T = TypeVar("T")


class LiveApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: FastAPI = create_app(settings)
        self.loop: asyncio.AbstractEventLoop | None = None
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without it a
        # keep-alive request waited ~40 ms (Nagle against the client's delayed ACK) for its response's body.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", **uvicorn_options(settings.server))  # as `avatarchat serve`
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-app")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))

    def start(self, ready_timeout: float = 120, wait_for: str = "/ready") -> LiveApp:
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.http + wait_for, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("app did not become ready")

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the app's own event loop (to inspect its state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
