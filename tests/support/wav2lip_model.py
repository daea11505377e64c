"""A tiny ONNX model with Wav2Lip's inputs and output, built with onnx.helper: the Wav2Lip engine's plumbing
can be tested (and its plumbing cost measured) without the real weights.

face = clip(reference + lower_half · gain · loudness, 0, 1), where reference is channels 3..5 of ``video``
(the unmasked crop), lower_half is 1 on rows 48..95, and loudness = (mean(audio) + 4) / 8 is the mean of
the normalized mel window mapped to [0, 1] (silence: 0). So louder speech brightens the lower half of the
face, and silence gives back the reference crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, *, gain: float = 0.6, batch: int | str = "B", audio_name: str = "audio",
          video_shape: tuple[int, int, int] = (6, 96, 96), output_name: str = "face") -> Path:
    lower = np.zeros((1, 1, 96, 96), np.float32)
    lower[..., 48:, :] = 1.0
    inits = [
        numpy_helper.from_array(lower, "lower"),
        numpy_helper.from_array(np.array([3], np.int64), "c0"),
        numpy_helper.from_array(np.array([6], np.int64), "c1"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(np.array(gain / 8.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [audio_name], ["mean"], axes=[1, 2, 3], keepdims=1),  # (B, 1, 1, 1)
        helper.make_node("Add", ["mean", "four"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "scale"], ["amount"]),  # gain · (mean + 4) / 8
        helper.make_node("Mul", ["lower", "amount"], ["lift"]),  # (B, 1, 96, 96)
        helper.make_node("Slice", ["video", "c0", "c1", "ax"], ["reference"]),  # (B, 3, 96, 96)
        helper.make_node("Add", ["reference", "lift"], ["raw"]),
        helper.make_node("Clip", ["raw", "zero", "one"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wav2lip",
        [helper.make_tensor_value_info(audio_name, TensorProto.FLOAT, [batch, 1, 80, 16]),
         helper.make_tensor_value_info("video", TensorProto.FLOAT, [batch, *video_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 3, 96, 96])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="avatarchat-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
