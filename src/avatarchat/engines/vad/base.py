"""The voice-activity interface: a shared model, and a small stream object per session."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VADStream(Protocol):
    """Per-session state. ``push`` takes 16 kHz mono float32 and returns one speech probability per window."""

    window: int  # samples per probability

    def push(self, audio: np.ndarray) -> list[float]: ...

    def reset(self) -> None: ...


class VADEngine(Protocol):
    name: str
    sample_rate: int

    def load(self) -> None: ...

    def stream(self) -> VADStream: ...
