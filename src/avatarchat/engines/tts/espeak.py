"""espeak-ng (Debian package) as a second, formant TTS engine; it also speaks Mandarin (cmn-latn-pinyin).

It gives no phoneme timings, so the avatar lip-syncs from the audio envelope.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np

from avatarchat.config import EspeakConfig
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import Speech

_BASE_WPM = 160


class EspeakEngine:
    name = "espeak"

    def __init__(self, config: EspeakConfig) -> None:
        self._config = config
        self._binary: str | None = None

    def load(self) -> None:
        self._binary = shutil.which(self._config.binary)
        if self._binary is None:
            raise TTSError(f"{self._config.binary} not found; install it with: apt-get install espeak-ng")

    def voices(self) -> list[str]:
        return [self._config.voice]

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        if self._binary is None:
            raise TTSError("espeak-ng not loaded")
        cmd = [self._binary, "-v", self._config.voice, "-s", str(round(_BASE_WPM * rate)), "--stdout", "--", text]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=30, check=True)
        except (subprocess.SubprocessError, OSError) as e:
            raise TTSError(f"espeak-ng failed on {text[:60]!r}: {e}") from e
        with wave.open(io.BytesIO(proc.stdout)) as wav:
            sr = wav.getframerate()
            raw = wav.readframes(wav.getnframes())
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        return Speech(pcm, sr, None, text)
