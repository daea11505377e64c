"""Offline rendering for the ``say`` and ``chat`` commands: the same engines and media path as the server."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from avatarchat.config import Settings
from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.engines.llm.base import LLMError
from avatarchat.engines.avatar.wav2lip import Wav2LipModelError
from avatarchat.engines.registry import LLM_ENGINES, TTS_ENGINES, avatar_library
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.video.fmp4 import Fmp4Stream
from avatarchat.pipeline.history import History
from avatarchat.pipeline.media import Timeline, render_batch, speakable, speech_track
from avatarchat.pipeline.segmenter import split_text

Step = Callable[[str], AbstractContextManager[None]]


class RenderError(RuntimeError):
    pass


@dataclass
class RenderInfo:
    text: str
    frames: int
    seconds: float


def ask(settings: Settings, text: str) -> str:
    async def go() -> str:
        llm = LLM_ENGINES[settings.llm.engine](settings)
        await llm.start()
        try:
            history = History(settings.llm.system_prompt, settings.llm.history_token_budget)
            parts = [
                d
                async for d in llm.stream(
                    history.messages(text), max_tokens=settings.llm.max_tokens, temperature=settings.llm.temperature
                )
            ]
            return "".join(parts).strip()
        finally:
            await llm.close()

    return asyncio.run(go())


def render_to_file(
    settings: Settings, text: str, output: Path, avatar: str, *, ask_llm: bool, step: Step
) -> RenderInfo:
    if not text.strip():
        raise RenderError("nothing to say: TEXT is empty")
    try:
        if ask_llm:
            with step(f"asking the LLM ({settings.llm.engine})"):
                text = ask(settings, text)
            if not text:
                raise RenderError("the LLM returned an empty answer")
        tts = TTS_ENGINES[settings.tts.engine](settings)
        with step(f"loading TTS ({settings.tts.engine})"):
            tts.load()
        with step(f"loading avatar {avatar!r} ({settings.avatar.engine})"):
            renderer = avatar_library(settings).renderer(avatar)
    except (LLMError, TTSError, UnknownAvatarError, FileNotFoundError, Wav2LipModelError) as e:
        raise RenderError(str(e)) from e

    pieces = [p for p in (speakable(t) for t in split_text(text)) if p]
    if not pieces:
        raise RenderError("nothing speakable in TEXT")
    fps = settings.avatar.fps
    rate = settings.video.audio_sample_rate or getattr(tts, "sample_rate", 22050)
    timeline = Timeline(fps, rate)
    width, height = renderer.size
    v = settings.video
    stream = Fmp4Stream(width, height, fps, rate, crf=v.crf, preset=v.preset, threads=v.threads, audio_bitrate=v.audio_bitrate)
    speech = speech_track(renderer, rate, fps)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".say-", suffix=".mp4", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f, step(f"rendering {len(pieces)} piece(s)"):
            frame = 0
            for piece_text in pieces:
                try:
                    piece = timeline.prepare(tts.synthesize(piece_text, rate=settings.tts.rate))
                except TTSError as e:
                    raise RenderError(str(e)) from e
                f.write(render_batch(stream, renderer, piece.mouth, frame, piece.audio, speech=speech))
                frame += piece.frames
            f.write(stream.close())
        os.replace(tmp, output)
    except BaseException:
        stream.abort()
        Path(tmp).unlink(missing_ok=True)
        raise
    return RenderInfo(text, timeline.frames, timeline.frames / fps)
