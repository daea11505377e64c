"""Prometheus metrics. One registry per process; /metrics exposes it."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

STAGE_SECONDS = Histogram(
    "avatarchat_stage_seconds",
    "Per-turn latency of each stage. first_* are measured from the user's message; tts and render per piece.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
RENDER_FPS = Gauge("avatarchat_render_fps", "Frames rendered and encoded per second, last batch.", registry=REGISTRY)
FRAMES = Counter("avatarchat_frames_total", "Video frames rendered and encoded.", registry=REGISTRY)
IDLE_CACHE = Counter("avatarchat_idle_frame_cache_total", "Look-ups of cached idle frames, by result (hit, miss).",
                     ["result"], registry=REGISTRY)
MEDIA_BYTES = Counter("avatarchat_media_bytes_total", "fMP4 bytes sent to clients.", registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("avatarchat_active_sessions", "Open WebSocket sessions.", registry=REGISTRY)
SESSIONS_REFUSED = Counter(
    "avatarchat_sessions_refused_total", "Sessions refused by a limit.", ["reason"], registry=REGISTRY
)
TURNS = Counter("avatarchat_turns_total", "Finished turns by how they ended.", ["reason"], registry=REGISTRY)
ERRORS = Counter("avatarchat_errors_total", "Error events sent to clients, by code.", ["code"], registry=REGISTRY)
READY = Gauge("avatarchat_ready", "1 once the models are loaded.", registry=REGISTRY)
BARGE_INS = Counter("avatarchat_barge_ins_total", "Replies interrupted by the person speaking.", registry=REGISTRY)
ECHOES = Counter(
    "avatarchat_echoes_ignored_total", "Sounds while the avatar spoke that were its own voice, not a barge-in.",
    registry=REGISTRY,
)
ECHO_WORD_CHECKS = Counter(
    "avatarchat_echo_word_checks_total",
    "Barge-ins the band fit was unsure of, by their transcript: the avatar's own words (echo) or not (person).",
    ["outcome"],
    registry=REGISTRY,
)
SPECULATIONS = Counter(
    "avatarchat_speculative_replies_total",
    "Replies started during the end-of-turn silence, by whether they were used or discarded.",
    ["outcome"],
    registry=REGISTRY,
)

# The last turns' latencies for GET /api/monitor (the web app's dashboard); a bounded ring, in memory.
RECENT_TURNS: deque[dict[str, object]] = deque(maxlen=200)


def record_turn(session_id: str, turn_id: int, reason: str, timings: dict[str, int], asr_ms: int | None) -> None:
    RECENT_TURNS.append(
        {"at": time.time(), "session": session_id[:8], "turn_id": turn_id, "reason": reason, "asr_ms": asr_ms, **timings}
    )

# The CPU scheduler (pipeline/scheduler.py): live work across sessions, earliest deadline first.
CPU_QUEUE = Gauge("avatarchat_cpu_queue", "Units of CPU work waiting for a core.", registry=REGISTRY)
CPU_WAIT_SECONDS = Histogram(
    "avatarchat_cpu_wait_seconds", "Time a unit of CPU work waited for a core, by kind.", ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY,
)
CPU_BUSY_SECONDS = Counter(
    "avatarchat_cpu_busy_seconds_total", "Core-seconds of live work run by the scheduler, by kind.", ["kind"],
    registry=REGISTRY,
)
CPU_THREAD_SECONDS = Counter(
    "avatarchat_cpu_thread_seconds_total", "CPU time of the scheduler's units' own threads, by kind: below the "
    "busy seconds when units wait for a core or for Python's GIL.", ["kind"], registry=REGISTRY,
)
CPU_LATE = Counter(
    "avatarchat_cpu_late_total", "Units of CPU work that finished after their deadline, by kind.", ["kind"],
    registry=REGISTRY,
)
LLM_BATCH_TOKENS = Histogram(
    "avatarchat_llm_batch_tokens", "Tokens per llama.cpp decoding step (all sessions batched).",
    buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY,
)
LLM_SEQUENCES = Gauge("avatarchat_llm_sequences", "Sessions decoding in the last llama.cpp step.", registry=REGISTRY)
CAPACITY_SESSIONS = Gauge("avatarchat_capacity_sessions", "Real-time sessions this process holds (measured).",
                          registry=REGISTRY)
COST_PER_SPEECH_SECOND = Gauge(
    "avatarchat_cost_core_seconds_per_speech_second", "Live CPU work per second of speech (measured).",
    registry=REGISTRY,
)
DEGRADE_LEVEL = Gauge("avatarchat_degrade_level", "0: full quality; 1: overloaded, each face rendered for two frames.",
                      registry=REGISTRY)
HALF_RATE_BATCHES = Counter("avatarchat_half_rate_batches_total",
                            "Render batches whose faces were each shown for two frames, by why: overload (the "
                            "degrade level) or due (this stream is nearly dry while the CPU is busy).",
                            ["reason"], registry=REGISTRY)
CPU_RESCUED = Counter("avatarchat_cpu_rescued_total",
                      "Late render units run in the extra lane while every core's slot was busy.", registry=REGISTRY)
