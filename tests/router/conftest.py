from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from avatarchat.router.app import create_app
from avatarchat.router.config import load_config
from avatarchat.router.service import Router
from tests.support.openai_server import Behaviour, OpenAITestServer

ADMIN = "test-admin-token"


@pytest.fixture(scope="session")
def upstream_pool() -> Iterator[list[OpenAITestServer]]:
    servers = [OpenAITestServer().start() for _ in range(3)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def ups(upstream_pool: list[OpenAITestServer]) -> Iterator[list[OpenAITestServer]]:
    """Three loopback upstreams, each answering with its own name, reset for every test."""
    for i, s in enumerate(upstream_pool):
        s.behaviour = Behaviour(reply=f"answer from {'abc'[i]} .")
        s.requests.clear()
        s.models_requests = 0
    yield upstream_pool
    for s in upstream_pool:
        s.behaviour = Behaviour()


def base_config(ups: list[OpenAITestServer], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {n: {"base_url": s.base_url, "api_key_env": f"ROUTER_TEST_KEY_{n.upper()}"} for n, s in zip("abc", ups)},
        "channels": [
            {"name": "a", "provider": "a", "models": ["qwen/qwen-2.5-7b:free", "shared-model"], "tags": ["fast"], "cost_in": 0, "cost_out": 0},
            {"name": "b", "provider": "b", "models": ["gpt-4o", "shared-model"], "tags": ["premium"], "cost_in": 2.5, "cost_out": 10, "quality": 0.9},
            {"name": "c", "provider": "c", "models": ["llama-3-70b", "shared-model"], "tags": ["cheap"], "cost_in": 0.2, "cost_out": 0.4},
        ],
        "aliases": {"smart": "gpt-4o", "anyfree": "tag:free"},
        "strategy": "balanced",
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "ttft_timeout_s": 1.0, "stall_timeout_s": 1.0,
                  "request_timeout_s": 5, "connect_timeout_s": 1.0},
        "cooldown": {"failure_threshold": 2, "base_s": 0.3, "max_s": 1.0, "auth_s": 0.5},
        "health": {"interval_s": 0},
        "admin": {"token_env": "ROUTER_TEST_ADMIN"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Live:
    router: Router
    url: str
    client: httpx.AsyncClient
    path: Path

    @property
    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN}"}

    async def chat(self, model: str, stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
        return await self.client.post("/v1/chat/completions", json=body)


@pytest.fixture
async def live_router(tmp_path: Path, ups: list[OpenAITestServer], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Factory: start the router app on a loopback port in this test's event loop."""
    monkeypatch.setenv("ROUTER_TEST_ADMIN", ADMIN)
    started: list[tuple[uvicorn.Server, asyncio.Task[Any], httpx.AsyncClient]] = []

    async def start(cfg: dict[str, Any] | None = None, name: str = "router.yaml") -> Live:
        path = write(tmp_path / name, cfg or base_config(ups))
        router = Router(load_config(path), path)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(router), log_level="error", lifespan="on"))
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # keep pytest's handlers
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.005)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        started.append((server, task, client))
        return Live(router, f"http://127.0.0.1:{port}", client, path)

    yield start
    for server, task, client in started:
        await client.aclose()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
