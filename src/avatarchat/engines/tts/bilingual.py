"""Two voices behind one engine (the auto profile): a piece with Chinese characters is spoken by the
Mandarin voice, any other by the English one. The LLM answers in the language it was asked in, so a
reply's pieces are all in one voice; the media pipeline resamples each piece to the stream's rate.
"""

from __future__ import annotations

import re

from avatarchat.engines.tts.base import TTSEngine
from avatarchat.engines.types import Speech

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class BilingualEngine:
    name = "bilingual"

    def __init__(self, chinese: TTSEngine, other: TTSEngine) -> None:
        self._chinese = chinese
        self._other = other

    @property
    def sample_rate(self) -> int:
        return int(getattr(self._chinese, "sample_rate", 24000))  # the stream's; the other voice is resampled

    def load(self) -> None:
        self._chinese.load()
        self._other.load()

    def voices(self) -> list[str]:
        return [*self._chinese.voices(), *self._other.voices()]

    def voice_for(self, text: str) -> TTSEngine:
        return self._chinese if _CJK.search(text) else self._other

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        return self.voice_for(text).synthesize(text, rate=rate)
