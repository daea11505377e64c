"""Each avatar's idle loop (blinks, small head motion, silence) as an MP4 the page loops between turns."""

from __future__ import annotations

import asyncio

import numpy as np

from avatarchat.engines.registry import Engines
from avatarchat.engines.video.fmp4 import Fmp4Stream

_AUDIO_RATE = 22050


def render_idle_clip(engines: Engines, name: str) -> bytes:
    renderer = engines.avatars.renderer(name)
    width, height = renderer.size
    v = engines.settings.video
    stream = Fmp4Stream(width, height, engines.settings.avatar.fps, _AUDIO_RATE, crf=v.crf, preset=v.preset, threads=v.threads)
    frames = 0
    for frame in renderer.idle_frames():
        stream.add_frame(frame)
        frames += 1
    # A silent track keeps the clip's shape the same as the turn streams.
    stream.add_audio(np.zeros(frames * _AUDIO_RATE // engines.settings.avatar.fps, np.float32))
    return stream.take() + stream.close()


class IdleClips:
    def __init__(self, engines: Engines) -> None:
        self._engines = engines
        self._clips: dict[str, asyncio.Future[bytes]] = {}

    def forget(self, name: str) -> None:
        self._clips.pop(name, None)

    async def get(self, name: str) -> bytes:
        """Render once per avatar (in a worker thread); concurrent callers share the result."""
        fut = self._clips.get(name)
        if fut is None:
            loop = asyncio.get_running_loop()
            # Background work: the idle loop of a new avatar never delays a live turn (low OS priority, one at a time).
            fut = asyncio.ensure_future(loop.run_in_executor(self._engines.cpu.background, render_idle_clip,
                                                             self._engines, name))
            self._clips[name] = fut
        try:
            return await asyncio.shield(fut)
        except Exception:
            self._clips.pop(name, None)
            raise
