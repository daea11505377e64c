"""GET /api/monitor: the web app's dashboard data as JSON (the /metrics text is for Prometheus)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
from fastapi import APIRouter, Query, Request

from avatarchat import metrics

router = APIRouter(prefix="/api")
_STARTED = time.time()
_PROCESS = psutil.Process()


def _samples(metric: Any, suffix: str = "") -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value) for fam in metric.collect() for s in fam.samples if s.name == fam.name + suffix
    ]


def _capacity(request: Request) -> dict[str, Any]:
    capacity = getattr(request.app.state.engines, "capacity", None)
    if capacity is None:
        return {}
    cost = capacity.cost
    return {"capacity_sessions": capacity.sessions, "cost_per_speech_s": None if cost is None else round(cost, 3),
            "degrade_level": capacity.degrade}


@router.get("/monitor")
async def monitor(request: Request, turns: int = Query(50, ge=1, le=200)) -> dict[str, Any]:
    """Process CPU % (since the previous call), RSS, threads, open fds and asyncio tasks (what a leak grows: see
    bench/bench_soak.py), sessions, render fps, errors and the last turns' latencies."""
    with _PROCESS.oneshot():
        cpu = _PROCESS.cpu_percent(interval=None)
        rss = _PROCESS.memory_info().rss
        threads = _PROCESS.num_threads()
    fds = _PROCESS.num_fds()
    errors = {labels["code"]: int(v) for labels, v in _samples(metrics.ERRORS, "_total")}
    turn_reasons = {labels["reason"]: int(v) for labels, v in _samples(metrics.TURNS, "_total")}
    fps = _samples(metrics.RENDER_FPS)
    return {
        "time": time.time(),
        "uptime_s": round(time.time() - _STARTED, 1),
        "ready": request.app.state.engines.ready.is_set(),
        "sessions": len(request.app.state.sessions),
        "max_sessions": request.app.state.settings.session.max_sessions,
        **_capacity(request),
        "cpu_percent": round(cpu, 1),
        "cpu_count": psutil.cpu_count() or 1,
        "rss_mb": round(rss / 2**20, 1),
        "threads": threads,  # the process's, native ones (ONNX Runtime, OpenMP, ...) included
        "fds": fds,
        "tasks": len(asyncio.all_tasks()),
        "fps": round(fps[0][1], 1) if fps else 0.0,
        "target_fps": request.app.state.settings.avatar.fps,
        "frames_total": int(sum(v for _, v in _samples(metrics.FRAMES, "_total"))),
        # Render batches shown at half the face rate instead of stalling: overload, or a stream nearly dry.
        "half_rate_batches": {labels["reason"]: int(v) for labels, v in _samples(metrics.HALF_RATE_BATCHES, "_total")},
        "errors": errors,
        "errors_total": sum(errors.values()),
        "turns_total": turn_reasons,
        "turns": list(metrics.RECENT_TURNS)[-turns:],
    }
