"""Data that flows between engines. Engines themselves are described by the Protocols in each engine package."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class PhonemeTiming:
    """One phoneme (IPA symbol as the TTS engine spelled it) and where it sits in the audio, in seconds."""

    phoneme: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Speech:
    """Synthesized speech for one piece of text.

    ``audio`` is mono float32 in [-1, 1]. ``phonemes`` is None when the engine gives no alignments;
    the avatar then drives the mouth from the audio envelope alone.
    """

    audio: np.ndarray
    sample_rate: int
    phonemes: tuple[PhonemeTiming, ...] | None = None
    text: str = ""

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass(slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str
    tokens: int = field(default=0, compare=False)

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}
