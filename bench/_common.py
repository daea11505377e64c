"""Shared bench helpers: start the real server as a subprocess, talk to it over WebSocket, summarize."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np

HEADER = struct.Struct(">2sBBI")


def _burn(fraction: float, stop: Any) -> None:
    """Use about ``fraction`` of one core until ``stop`` is set."""
    period = 0.02
    while not stop.is_set():
        end = time.perf_counter() + period * fraction
        while time.perf_counter() < end:
            pass
        time.sleep(period * (1 - fraction))


@contextmanager
def cpu_load(cores: float) -> Iterator[None]:
    """Other work on the machine: ``cores`` of busy loops (0.5 = half of one core) in child processes."""
    import multiprocessing

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(min(1.0, cores - k), stop), daemon=True)
               for k in range(int(-(-cores // 1)))] if cores > 0 else []
    for b in burners:
        b.start()
    try:
        yield
    finally:
        stop.set()
        for b in burners:
            b.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = os.environ.get("BENCH_SERVER_LOG")  # a file for the server's log (at BENCH_SERVER_LOG_LEVEL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarchat", "serve", "--port", str(port)],
        env={**os.environ, "AVATARCHAT_SERVER__LOG_LEVEL": os.environ.get("BENCH_SERVER_LOG_LEVEL", "warning"),
             **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "a") if log else subprocess.DEVNULL,  # noqa: SIM115 (the child holds it)
    )
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.1)
        else:
            raise TimeoutError("server not ready")
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(30)


def summary(values: list[float], unit: str = "ms") -> str:
    a = np.asarray(values, dtype=float)
    return (
        f"p50 {np.percentile(a, 50):7.1f} {unit}  p95 {np.percentile(a, 95):7.1f} {unit}  "
        f"min {a.min():7.1f}  max {a.max():7.1f}  n={len(a)}"
    )


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(statistics.fmean(a)), "n": len(a)}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def dump(name: str, data: dict[str, Any]) -> None:
    os.makedirs("bench/results", exist_ok=True)
    with open(f"bench/results/{name}.json", "w") as f:
        json.dump({"machine": machine(), **data}, f, indent=2)


def one_core_speech(text: str) -> Any:
    """Piper's speech of ``text``; then this process is pinned to one core, OpenCV to one thread, so that
    render and encode figures are per core."""
    import cv2

    from avatarchat.config import PiperConfig
    from avatarchat.engines.tts.piper import PiperEngine

    tts = PiperEngine(PiperConfig())
    tts.load()
    speech = tts.synthesize(text)
    os.sched_setaffinity(0, {0})
    cv2.setNumThreads(1)
    return speech
