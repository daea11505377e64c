"""The avatar service's render streams for remote gateways: open, batch, close, abort, with limits.

Each stream is a ``LocalStream`` (an fMP4 encoder and the avatar's renderer in the worker pool) behind
its own lock, so a gateway's batches run one at a time, in order. At most ``max_streams`` are open
(503 beyond); a stream unused for ``idle_expiry_s`` is dropped by its own timer (``loop.call_later``,
no polling), so a gateway that vanishes leaks nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatarchat.config import RenderServiceConfig
from avatarchat.engines.video.fmp4 import AAC_RATES
from avatarchat.pipeline.avatar_media import LocalAvatarMedia, LocalStream, MediaError
from avatarchat.services.render_wire import RenderRequestError

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    stream: LocalStream
    avatar: str
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None


class RenderStreams:
    def __init__(self, media: LocalAvatarMedia, config: RenderServiceConfig, fps: int) -> None:
        self._media = media
        self.config = config
        self._fps = fps
        self._streams: dict[str, _Entry] = {}
        self._opening = 0
        self.frames = 0  # frames rendered for gateways by this process
        self.expired = 0

    def __len__(self) -> int:
        return len(self._streams)

    def avatars(self) -> list[str]:
        """The avatars the open streams render (safe to call from any thread)."""
        return [e.avatar for e in list(self._streams.values())]

    def status(self) -> dict[str, Any]:
        return {"streams": len(self._streams), "opening": self._opening, "max_streams": self.config.max_streams,
                "frames": self.frames, "expired": self.expired, "idle_expiry_s": self.config.idle_expiry_s}

    async def open(self, avatar: str, audio_rate: int, fps: int | None) -> dict[str, Any]:
        if audio_rate not in AAC_RATES:
            raise RenderRequestError(400, f"audio_rate {audio_rate} is not an AAC sample rate {AAC_RATES}")
        if fps is not None and fps != self._fps:
            raise RenderRequestError(400, f"this avatar service renders at {self._fps} fps, not {fps}: set avatar.fps alike")
        if len(self._streams) + self._opening >= self.config.max_streams:
            raise RenderRequestError(
                503, f"the avatar service is rendering its limit of {self.config.max_streams} streams; try again later")
        self._opening += 1
        try:
            stream = await self._media.open(avatar, audio_rate)
        except MediaError as e:
            raise RenderRequestError(404 if e.code == "unknown_avatar" else 500, str(e)) from e
        finally:
            self._opening -= 1
        stream_id = secrets.token_urlsafe(12)
        entry = self._streams[stream_id] = _Entry(stream, avatar)
        self._arm(stream_id, entry, self.config.idle_expiry_s)
        width, height = stream.size
        return {"id": stream_id, "mime": stream.mime, "width": width, "height": height, "fps": self._fps}

    def _get(self, stream_id: str) -> _Entry:
        entry = self._streams.get(stream_id)
        if entry is None:
            raise RenderRequestError(404, f"no render stream {stream_id[:40]!r} (closed, expired or never opened)")
        return entry

    async def batch(self, stream_id: str, mouth: np.ndarray, first_frame: int,
                    audio: np.ndarray | None, deadline: float | None = None) -> tuple[bytes, int]:
        entry = self._get(stream_id)
        async with entry.lock:
            if self._streams.get(stream_id) is not entry:  # aborted or expired while this batch waited
                raise RenderRequestError(404, f"render stream {stream_id[:40]!r} was closed")
            try:
                data = await entry.stream.batch(mouth, first_frame, audio, deadline=deadline)
            finally:
                entry.last_used = time.monotonic()
            self.frames += len(mouth)
            return data, entry.stream.frames

    async def close(self, stream_id: str) -> tuple[bytes, int]:
        entry = self._get(stream_id)
        async with entry.lock:
            if self._streams.get(stream_id) is not entry:
                raise RenderRequestError(404, f"render stream {stream_id[:40]!r} was closed")
            self._drop(stream_id)
            tail = await entry.stream.close()
            return tail, entry.stream.frames

    def abort(self, stream_id: str) -> bool:
        entry = self._drop(stream_id)
        if entry is None:
            return False
        entry.stream.abort()  # after the batch in flight, if any
        return True

    def close_all(self) -> None:
        for stream_id in list(self._streams):
            self.abort(stream_id)

    def _drop(self, stream_id: str) -> _Entry | None:
        entry = self._streams.pop(stream_id, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
        return entry

    def _arm(self, stream_id: str, entry: _Entry, delay: float) -> None:
        entry.timer = asyncio.get_running_loop().call_later(delay, self._expire, stream_id, entry)

    def _expire(self, stream_id: str, entry: _Entry) -> None:
        if self._streams.get(stream_id) is not entry:
            return
        idle = time.monotonic() - entry.last_used
        if entry.lock.locked() or idle < self.config.idle_expiry_s:
            self._arm(stream_id, entry, max(0.05, self.config.idle_expiry_s - (0 if entry.lock.locked() else idle)))
            return
        self.expired += 1
        log.warning("render stream expired", extra={"stream": stream_id, "avatar": entry.avatar, "idle_s": round(idle, 1)})
        self.abort(stream_id)
