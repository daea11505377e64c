"""The one retry layer: backoff with jitter on 429/5xx/connection errors (honouring Retry-After), then
failover to the next candidate. A stream is committed to a channel only when its first token arrives;
after that the answer is never spliced with another channel's: a failure becomes an error frame.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from avatarchat.router import sse
from avatarchat.router.config import RetryConfig
from avatarchat.router.health import ChannelHealth
from avatarchat.router.index import Entry
from avatarchat.router.upstream import Target, Upstream, UpstreamError

log = logging.getLogger("avatarchat.router")


@dataclass
class AttemptLog:
    channel: str
    model: str
    outcome: str
    status: int | None = None
    ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"channel": self.channel, "model": self.model, "outcome": self.outcome, "status": self.status, "ms": round(self.ms, 2)}


class RouteError(Exception):
    """No channel answered; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str, type_: str = "upstream_error",
                 retry_after: float | None = None, attempts: list[AttemptLog] | None = None, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.retry_after = status, message, code, type_, retry_after
        self.attempts = attempts or []
        self.body = body  # an upstream's own error body, passed through for client errors


@dataclass
class Candidate:
    entry: Entry
    target: Target
    health: ChannelHealth
    upstream: Upstream


@dataclass
class Committed:
    """A stream that has delivered its first token: relay() sends it to the caller."""

    candidate: Candidate
    gen: AsyncIterator[list[bytes]]
    buffered: list[bytes]
    started: float
    ttft_s: float
    attempts: list[AttemptLog] = field(default_factory=list)
    closed: bool = False

    async def abandon(self) -> None:
        """The caller left before relay() ran: release the upstream stream and the channel slot."""
        if not self.closed:
            self.closed = True
            await self.gen.aclose()
            self.candidate.health.end()
            self.candidate.health.probing = False


def backoff(attempt: int, cfg: RetryConfig) -> float:
    base = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** max(0, attempt - 1))
    return base * (1.0 + cfg.jitter * random.random())


async def run(candidates: list[Candidate], body: dict[str, Any], cfg: RetryConfig, stream: bool) -> tuple[bytes | Committed, Candidate, list[AttemptLog]]:
    """Try candidates in order until one answers (non-stream: the body; stream: a Committed)."""
    attempts: list[AttemptLog] = []
    rate_limited: list[float] = []
    total = 0
    for cand in candidates:
        h, tries = cand.health, 0
        while total < cfg.max_attempts:
            why = h.unavailable()
            if why is not None:
                attempts.append(AttemptLog(cand.entry.channel, cand.entry.model, f"skipped: {why}"))
                break
            total += 1
            tries += 1
            h.begin()
            t0 = time.monotonic()
            try:
                if stream:
                    committed = await _open(cand, body, cfg, t0)
                    attempts.append(AttemptLog(cand.entry.channel, cand.entry.model, "ok", 200, (time.monotonic() - t0) * 1000))
                    committed.attempts = attempts
                    return committed, cand, attempts
                data = await cand.upstream.complete(cand.target, body)
                h.end()
                h.success(time.monotonic() - t0)
                attempts.append(AttemptLog(cand.entry.channel, cand.entry.model, "ok", 200, (time.monotonic() - t0) * 1000))
                return data, cand, attempts
            except UpstreamError as e:
                h.end()
                elapsed = time.monotonic() - t0
                attempts.append(AttemptLog(cand.entry.channel, cand.entry.model, f"{e.kind}: {e.message}", e.status, elapsed * 1000))
                if e.auth:
                    h.auth_failure(e.status or 401, e.message)
                    break
                if e.client_error:
                    h.probing = False
                    raise RouteError(e.status or 400, e.message, "upstream_rejected_request", "invalid_request_error",
                                     attempts=attempts, body=e.body) from None
                if not e.retryable:  # e.g. 404: this channel lacks the model; not the channel's health
                    h.last_error, h.last_status, h.probing = e.message, e.status, False
                    break
                ra = e.retry_after
                if e.status == 429:
                    rate_limited.append(ra or 0.0)
                if ra is not None and ra > cfg.max_retry_after_s:
                    h.failure(e.message, e.status, retry_after=ra, latency_s=elapsed)
                    break  # don't wait that long here: the channel cools down, the next one answers
                h.failure(e.message, e.status, latency_s=elapsed)
                if e.kind in ("ttft", "stall") or tries > cfg.per_channel_retries or h.unavailable() is not None:
                    break
                delay = backoff(tries, cfg)
                if ra is not None:
                    delay = max(delay, ra)
                await asyncio.sleep(delay)
            except BaseException:
                h.end()
                h.probing = False
                raise
        if total >= cfg.max_attempts:
            break
    summary = "; ".join(f"{a.channel}: {a.outcome}" for a in attempts) or "no attempt made"
    if rate_limited and len(rate_limited) == sum(1 for a in attempts if not a.outcome.startswith("skipped")):
        raise RouteError(429, f"every channel is rate limited ({summary})", "rate_limited", "rate_limit_error",
                         retry_after=max(1.0, min(rate_limited)), attempts=attempts)
    if all(a.outcome.startswith("skipped") for a in attempts):
        raise RouteError(503, f"no channel available ({summary})", "no_available_channel", attempts=attempts,
                         retry_after=max(1.0, min((c.health.retry_in() for c in candidates), default=1.0)))
    raise RouteError(502, f"all {len(attempts)} attempts failed ({summary})", "upstream_failed", attempts=attempts)


async def _open(cand: Candidate, body: dict[str, Any], cfg: RetryConfig, t0: float) -> Committed:
    gen = cand.upstream.stream(cand.target, body)
    buffered: list[bytes] = []
    try:
        async with asyncio.timeout(cfg.ttft_timeout_s):
            committed = False
            async for batch in gen:
                for i, payload in enumerate(batch):
                    if payload == sse.DONE:
                        buffered.append(payload)
                        committed = True
                        break
                    msg = sse.error_in(payload)
                    if msg is not None:
                        raise UpstreamError(f"error frame before the first token: {msg}", kind="protocol")
                    buffered.append(payload)
                    if sse.has_output(payload):
                        buffered += batch[i + 1 :]  # the same channel's: relay() checks them
                        committed = True
                        break
                if committed:
                    break
            else:
                raise UpstreamError("stream ended before the first token", kind="dropped")
    except TimeoutError:
        await gen.aclose()
        raise UpstreamError(f"no first token within {cfg.ttft_timeout_s:g} s", kind="ttft") from None
    except BaseException:
        await gen.aclose()
        raise
    return Committed(cand, gen, buffered, t0, time.monotonic() - t0)


def _finished(payload: bytes) -> bool:
    i = payload.find(b'"finish_reason"')
    if i < 0:
        return False
    rest = payload[i + 15 : i + 24].lstrip(b": ")
    return not rest.startswith(b"null")


async def relay(c: Committed, stall_timeout_s: float) -> AsyncIterator[bytes]:
    """SSE bytes for the caller: the committed channel's frames, ending in ``data: [DONE]``; a failure after
    the first token ends the stream with an error frame (never another channel's text). Frames that
    arrived together are sent together."""
    h = c.candidate.health
    ch = c.candidate.entry.channel
    ok, finished, failure = False, False, None
    out: list[bytes] = []

    def take(batch: list[bytes]) -> bool:
        """Frames for ``batch`` into ``out``; True when the stream is over."""
        nonlocal ok, finished, failure
        for p in batch:
            if p == sse.DONE:
                ok = True
                out.append(sse.DONE_FRAME)
                return True
            if b'"error"' in p and (msg := sse.error_in(p)) is not None:
                failure = f"upstream error mid-stream: {msg}"
                out.extend([sse.error_frame(f"{failure} (channel {ch})", code="stream_interrupted"), sse.DONE_FRAME])
                return True
            if not finished:
                finished = _finished(p)
            out.append(sse.frame(p))
        return False

    try:
        over = take(c.buffered)
        yield b"".join(out)
        out.clear()
        if over:
            return
        it = aiter(c.gen)
        # HTTP upstreams enforce the stall timeout as httpx's read timeout (no timer per chunk here);
        # the in-process engine has no socket, so it gets an explicit one.
        timed = c.candidate.target.local
        while True:
            try:
                if timed:
                    async with asyncio.timeout(stall_timeout_s):
                        batch = await anext(it)
                else:
                    batch = await anext(it)
            except StopAsyncIteration:
                if finished:
                    ok = True
                else:
                    failure = "upstream stream ended before the answer was complete"
                    yield sse.error_frame(f"{failure} (channel {ch})", code="stream_interrupted")
                yield sse.DONE_FRAME
                return
            except TimeoutError:
                failure = f"upstream stalled for {stall_timeout_s:g} s"
                yield sse.error_frame(f"{failure} (channel {ch})", code="stream_stalled") + sse.DONE_FRAME
                return
            over = take(batch)
            yield b"".join(out)
            out.clear()
            if over:
                return
    except UpstreamError as e:
        failure = e.message
        if e.kind == "timeout":
            failure = f"upstream stalled for {stall_timeout_s:g} s"
            yield sse.error_frame(f"{failure} (channel {ch})", code="stream_stalled") + sse.DONE_FRAME
        else:
            yield sse.error_frame(f"upstream failed mid-stream: {e.message} (channel {ch})",
                                  code="stream_interrupted") + sse.DONE_FRAME
    finally:
        if not c.closed:
            c.closed = True
            await c.gen.aclose()
            h.end()
            if ok:
                h.success(time.monotonic() - c.started, c.ttft_s)
            elif failure is not None:
                log.warning("stream failed after its first token", extra={"channel": h.name, "error": failure})
                h.failure(failure)
            else:
                h.probing = False  # the caller went away
