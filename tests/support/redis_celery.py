"""A real redis-server on a free loopback port, and a real Celery worker subprocess, for queue-mode tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from avatarchat.services.llm_queue import WORKER_KEY

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
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def start(self) -> RedisServer:
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *auth],
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

    def kill(self) -> None:
        """Die at once, as a crash would (no shutdown, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def beating_pid(redis_url: str) -> int | None:
    """The pid of the Celery worker that last wrote the liveness key (None: no worker is alive)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=5)
    try:
        raw = client.get(WORKER_KEY)
    finally:
        client.close()
    return None if raw is None else int(json.loads(raw)["pid"])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class CeleryWorker:
    """``celery -A avatarchat.services.llm_tasks worker`` with the test's Redis and LLM server; with
    ``supervised``, run under ``python -m avatarchat.supervise`` as scripts/run.sh runs it."""

    def __init__(self, redis_url: str, llm_base_url: str, concurrency: int = 64, *, worker_timeout_s: float = 5.0,
                 supervised: bool = False) -> None:
        self.redis_url = redis_url
        self.llm_base_url = llm_base_url
        self.concurrency = concurrency
        self.worker_timeout_s = worker_timeout_s
        self.supervised = supervised
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        worker = [sys.executable, "-m", "celery", "-A", "avatarchat.services.llm_tasks", "worker", "-P", "threads",
                  "-c", str(self.concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat",
                  "-l", "warning"]
        if self.supervised:
            return [sys.executable, "-m", "avatarchat.supervise", "--min-delay", "0.2", "--stop-timeout", "15", "--",
                    *worker]
        return worker

    def start(self) -> CeleryWorker:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
            AVATARCHAT_SERVICES__LLM__REDIS_URL=self.redis_url,
            AVATARCHAT_SERVICES__LLM__WORKER_TIMEOUT_S=str(self.worker_timeout_s),
            AVATARCHAT_LLM__ENGINE="openai",
            AVATARCHAT_LLM__OPENAI__BASE_URL=self.llm_base_url,
        )
        env.pop("AVATARCHAT_CONFIG", None)
        self.proc = subprocess.Popen(self.command(), env=env, cwd=ROOT)
        return self

    def wait_beating(self, timeout: float = 60) -> int:
        """Wait until this worker (unsupervised) or a child of this supervisor beats; its pid."""
        assert self.proc is not None
        seen: list[int] = []

        def beating() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Celery worker exited with code {self.proc.returncode}")
            pid = beating_pid(self.redis_url)
            ours = pid is not None and (pid == self.proc.pid if not self.supervised else pid in self.children())
            if ours:
                seen.append(pid)  # type: ignore[arg-type]
            return ours

        wait_until(beating, timeout, "the Celery worker beats")
        return seen[-1]

    def children(self) -> set[int]:
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return {int(p) for p in f.read().split()}
        except FileNotFoundError:
            return set()

    def stop(self) -> None:
        stop_process(self.proc, 20)
