"""Where a session's avatar video comes from: names, sizes, each turn's fMP4 stream and the idle clips.

``LocalAvatarMedia`` renders and encodes in this process's CPU scheduler, each batch by its deadline
(roles ``all`` and ``avatar``);
services/render_client.py's ``RemoteAvatarMedia`` asks the avatar service over HTTP (role ``gateway``).
A turn opens its stream while the LLM and TTS work, so the first fragment does not pay for it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from avatarchat import metrics
from avatarchat.config import Settings
from avatarchat.engines.avatar.library import AvatarLibrary, UnknownAvatarError
from avatarchat.engines.avatar.base import AvatarRendererProtocol, SpeechTrack
from avatarchat.engines.video.fmp4 import Fmp4Stream
from avatarchat.pipeline.media import render_batch, speech_track
from avatarchat.pipeline.capacity import Capacity
from avatarchat.pipeline.scheduler import CpuScheduler


class MediaError(Exception):
    """Rendering failed or its service is unreachable; ``code`` is the client's error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  # the avatar service's HTTP status, if it answered


class MediaStream(Protocol):
    """One turn's fMP4 timeline. Calls come one at a time, in order."""

    @property
    def mime(self) -> str: ...

    @property
    def frames(self) -> int:
        """Video frames in the stream so far; after ``close`` with the frames repeated to cover the audio tail."""
        ...

    async def batch(self, mouth: np.ndarray, first_frame: int, audio: np.ndarray | None, *,
                    deadline: float | None = None) -> bytes:
        """Encode ``audio`` (mono float32 at the stream's rate) then one frame per mouth row; the bytes produced.
        ``deadline`` (``time.perf_counter()``) is when the player needs them; None: as they come."""
        ...

    async def close(self) -> bytes:
        """Flush the encoders: the last bytes."""
        ...

    def abort(self) -> None:
        """Drop the stream without flushing. Never blocks; a no-op once closed."""
        ...


class AvatarMedia(Protocol):
    def names(self) -> list[str]:
        """The avatars known now (may be a moment old), for the session's options."""
        ...

    async def list_names(self) -> list[str]:
        """The avatars, looked up if the known list is old."""
        ...

    async def exists(self, name: str) -> bool:
        """Whether ``name`` can be used now; a name not seen yet is looked up afresh."""
        ...

    async def size(self, name: str) -> tuple[int, int]:
        """(width, height), loading the avatar's renderer if needed. Raises UnknownAvatarError."""
        ...

    async def open(self, name: str, audio_rate: int, *, deadline: float | None = None) -> MediaStream: ...

    async def idle_clip(self, name: str) -> bytes:
        """The avatar's idle loop as an MP4. Raises UnknownAvatarError."""
        ...

    def forget(self, name: str) -> None:
        """A deleted avatar: drop what is cached about it."""
        ...

    async def close(self) -> None: ...


class IdleSource(Protocol):
    async def get(self, name: str) -> bytes: ...

    def forget(self, name: str) -> None: ...


def _render_counted(stream: Fmp4Stream, renderer: AvatarRendererProtocol, mouth: np.ndarray, first_frame: int,
                    audio: np.ndarray | None, hold: int = 1, speech: SpeechTrack | None = None) -> bytes:
    """Runs in a worker. Counted here: the process that renders reports the frames."""
    started = time.perf_counter()
    data = render_batch(stream, renderer, mouth, first_frame, audio, hold, speech)
    elapsed = time.perf_counter() - started
    metrics.FRAMES.inc(len(mouth))
    metrics.RENDER_FPS.set(len(mouth) / elapsed if elapsed > 0 else 0.0)
    return data


class LocalStream:
    """An ``Fmp4Stream`` and the avatar's renderer, driven in the CPU scheduler (with the stream's speech, for a
    renderer driven by audio)."""

    def __init__(self, stream: Fmp4Stream, renderer: AvatarRendererProtocol, cpu: CpuScheduler,
                 capacity: Capacity | None = None, speech: SpeechTrack | None = None) -> None:
        self._stream = stream
        self._renderer = renderer
        self._speech = speech
        self._cpu = cpu
        self._capacity = capacity
        self._inflight: Future[bytes] | None = None
        self.closed = False
        self.mime = stream.mime

    @property
    def frames(self) -> int:
        return self._stream.frames

    @property
    def size(self) -> tuple[int, int]:
        return self._renderer.size

    async def _work(self, deadline: float | None, fn: object, *args: object) -> bytes:
        due = time.perf_counter() if deadline is None else deadline
        future: Future[bytes] = self._cpu.submit(fn, *args, deadline=due, kind="render")  # type: ignore[arg-type]
        self._inflight = future
        return await asyncio.wrap_future(future)

    async def batch(self, mouth: np.ndarray, first_frame: int, audio: np.ndarray | None, *,
                    deadline: float | None = None) -> bytes:
        if self.closed:
            raise MediaError("render_failed", "the stream is closed")
        # Fewer faces before a stall: when the process is overloaded, or when this stream's frames are already
        # due (its player is within the safety margin of running dry) while the cores are busy, as when
        # many turns start at once.
        hold = 1
        if self._capacity is not None and self._capacity.check():
            hold = 2
            metrics.HALF_RATE_BATCHES.labels("overload").inc()
        elif deadline is not None and deadline <= time.perf_counter() and self._cpu.contended():
            hold = 2
            metrics.HALF_RATE_BATCHES.labels("due").inc()
        data = await self._work(deadline, _render_counted, self._stream, self._renderer, mouth, first_frame, audio,
                                hold, self._speech)
        if self._capacity is not None:
            self._capacity.observe_video(len(mouth) / self._stream.fps)
        return data

    async def close(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        return await self._work(None, self._stream.close)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        inflight, stream = self._inflight, self._stream
        if inflight is not None and not inflight.done():
            # A worker is still encoding into the stream: close it once that batch returns.
            inflight.add_done_callback(lambda _f: stream.abort())
        else:
            stream.abort()


class LocalAvatarMedia:
    def __init__(self, avatars: AvatarLibrary, cpu: CpuScheduler, settings: Settings, idle: IdleSource | None = None,
                 capacity: Capacity | None = None) -> None:
        self._avatars = avatars
        self._cpu = cpu
        self._capacity = capacity
        self._s = settings
        self._idle = idle

    def names(self) -> list[str]:
        return self._avatars.names()

    async def list_names(self) -> list[str]:
        return self._avatars.names()

    async def exists(self, name: str) -> bool:
        return name in self._avatars.names()

    async def size(self, name: str) -> tuple[int, int]:
        renderer = await self._cpu.run(self._avatars.renderer, name, deadline=time.perf_counter(), kind="load")
        return renderer.size

    def _open(self, name: str, audio_rate: int) -> LocalStream:
        """Runs in a worker: create the stream and open its encoders (the init segment is written now)."""
        renderer = self._avatars.renderer(name)
        width, height = renderer.size
        v = self._s.video
        stream = Fmp4Stream(width, height, self._s.avatar.fps, audio_rate, crf=v.crf, preset=v.preset,
                            threads=v.threads, audio_bitrate=v.audio_bitrate)
        stream.start()
        return LocalStream(stream, renderer, self._cpu, self._capacity, speech_track(renderer, audio_rate, self._s.avatar.fps))

    async def open(self, name: str, audio_rate: int, *, deadline: float | None = None) -> LocalStream:
        due = time.perf_counter() if deadline is None else deadline
        future = self._cpu.submit(self._open, name, audio_rate, deadline=due, kind="render")
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(_abort_opened)  # opened after nobody wanted it
            raise
        except UnknownAvatarError as e:
            raise MediaError("unknown_avatar", f"no avatar named {name!r}") from e
        except Exception as e:
            raise MediaError("render_failed", f"could not open the video stream: {type(e).__name__}: {e}") from e

    async def idle_clip(self, name: str) -> bytes:
        if self._idle is None or name not in self._avatars.names():
            raise UnknownAvatarError(name)
        return await self._idle.get(name)

    def forget(self, name: str) -> None:
        self._avatars.forget(name)
        if self._idle is not None:
            self._idle.forget(name)

    async def close(self) -> None:
        return None


def _abort_opened(future: Future[LocalStream]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().abort()
