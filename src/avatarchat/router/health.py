"""Per-channel health: circuit breaker with growing cooldown, auth failures, EWMA latency/TTFT, limits."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from avatarchat.router.config import CooldownConfig

log = logging.getLogger("avatarchat.router")


@dataclass
class ChannelHealth:
    name: str
    cooldown: CooldownConfig
    alpha: float = 0.3
    rpm: int | None = None
    max_concurrency: int | None = None
    state: str = "closed"  # closed | open | half_open
    open_until: float = 0.0  # monotonic
    trips: int = 0
    consecutive_failures: int = 0
    auth_error: str | None = None
    auth_until: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None  # wall clock
    last_status: int | None = None
    ewma_latency_s: float | None = None
    ewma_ttft_s: float | None = None
    success_rate: float = 1.0  # EWMA of 1/0 outcomes
    requests: int = 0
    failures: int = 0
    inflight: int = 0
    probing: bool = False  # a half-open trial is in flight
    _recent: deque[float] = field(default_factory=deque)

    # -- availability -------------------------------------------------------------------------
    def unavailable(self, now: float | None = None) -> str | None:
        """Why this channel cannot take a request now, or None."""
        now = time.monotonic() if now is None else now
        if self.auth_error and now < self.auth_until:
            return f"auth failed ({self.auth_error}); retried in {self.auth_until - now:.1f} s or on a passing health check"
        if self.state == "open":
            if now < self.open_until:
                return f"cooling down ({self.open_until - now:.1f} s left) after: {self.last_error}"
            self.state = "half_open"
        if self.state == "half_open" and self.probing:
            return "half-open: a trial request is in flight"
        if self.max_concurrency is not None and self.inflight >= self.max_concurrency:
            return f"at max_concurrency {self.max_concurrency}"
        if self.rpm is not None:
            while self._recent and now - self._recent[0] > 60.0:
                self._recent.popleft()
            if len(self._recent) >= self.rpm:
                return f"rate limit {self.rpm} rpm reached"
        return None

    def retry_in(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        waits = [t - now for t in (self.open_until, self.auth_until) if t > now]
        return min(waits) if waits else 0.0

    # -- accounting ---------------------------------------------------------------------------
    def begin(self) -> None:
        now = time.monotonic()
        self.inflight += 1
        self.requests += 1
        if self.rpm is not None:
            self._recent.append(now)
        if self.state == "half_open":
            self.probing = True

    def end(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def success(self, latency_s: float, ttft_s: float | None = None) -> None:
        self.ewma_latency_s = self._ewma(self.ewma_latency_s, latency_s)
        if ttft_s is not None:
            self.ewma_ttft_s = self._ewma(self.ewma_ttft_s, ttft_s)
        self.success_rate = self._ewma(self.success_rate, 1.0)
        self.last_status = 200
        self.recovered()

    def recovered(self) -> None:
        if self.state != "closed" or self.auth_error:
            log.info("channel recovered", extra={"channel": self.name})
        self.state, self.trips, self.consecutive_failures, self.probing = "closed", 0, 0, False
        self.auth_error, self.auth_until = None, 0.0

    def failure(self, message: str, status: int | None = None, retry_after: float | None = None,
                latency_s: float | None = None) -> None:
        now = time.monotonic()
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error, self.last_error_at, self.last_status = message, time.time(), status
        self.success_rate = self._ewma(self.success_rate, 0.0)
        if latency_s is not None:
            self.ewma_latency_s = self._ewma(self.ewma_latency_s, latency_s)
        if retry_after is not None and retry_after > 0:
            self._open(now, retry_after, f"Retry-After {retry_after:g} s")
        elif self.state == "half_open" or self.consecutive_failures >= self.cooldown.failure_threshold:
            self._open(now, min(self.cooldown.max_s, self.cooldown.base_s * 2**self.trips), message)
        self.probing = False

    def _open(self, now: float, seconds: float, why: str) -> None:
        self.trips += 1
        self.state = "open"
        self.open_until = max(self.open_until, now + seconds)
        log.warning("channel cooling down", extra={"channel": self.name, "seconds": round(seconds, 3), "reason": why})

    def auth_failure(self, status: int, message: str) -> None:
        """401/403: loud, visible, and retried later (a key may be rotated), never a silent permanent ban."""
        self.failures += 1
        self.last_error, self.last_error_at, self.last_status = f"{status}: {message}", time.time(), status
        self.auth_error = f"HTTP {status}: {message[:200]}"
        self.auth_until = time.monotonic() + self.cooldown.auth_s
        self.probing = False
        log.error("channel credentials rejected; check its API key", extra={"channel": self.name, "status": status, "detail": message[:200]})

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        reason = self.unavailable(now)
        state = "auth_failed" if self.auth_error and now < self.auth_until else self.state
        return {
            "state": state,
            "available": reason is None,
            "unavailable_reason": reason,
            "cooldown_remaining_s": round(self.retry_in(now), 3),
            "consecutive_failures": self.consecutive_failures,
            "trips": self.trips,
            "auth_error": self.auth_error,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_status": self.last_status,
            "ewma_latency_ms": None if self.ewma_latency_s is None else round(self.ewma_latency_s * 1000, 2),
            "ewma_ttft_ms": None if self.ewma_ttft_s is None else round(self.ewma_ttft_s * 1000, 2),
            "success_rate": round(self.success_rate, 4),
            "requests": self.requests,
            "failures": self.failures,
            "inflight": self.inflight,
        }
