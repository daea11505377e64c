"""A real redis-server on a free loopback port, and a real Celery worker subprocess, for queue-mode tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, wait_s: float) -> None:
    """Terminate ``proc`` if it runs; kill it if it has not exited within ``wait_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class CeleryWorker:
    """``celery -A avatarchat.services.llm_tasks worker`` with the test's Redis and LLM server."""

    def __init__(self, redis_url: str, llm_base_url: str, concurrency: int = 64) -> None:
        self.redis_url = redis_url
        self.llm_base_url = llm_base_url
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
            AVATARCHAT_SERVICES__LLM__REDIS_URL=self.redis_url,
            AVATARCHAT_LLM__ENGINE="openai",
            AVATARCHAT_LLM__OPENAI__BASE_URL=self.llm_base_url,
        )
        env.pop("AVATARCHAT_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "avatarchat.services.llm_tasks", "worker", "-P", "threads",
             "-c", str(self.concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "warning"],
            env=env, cwd=ROOT,
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc, 15)
