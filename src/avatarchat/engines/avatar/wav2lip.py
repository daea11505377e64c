"""``avatar.engine: wav2lip``: the seed's Wav2Lip (Prajwal et al. 2020) on ONNX Runtime, with weights the user supplies.

Per frame, as in Wav2Lip's ``inference.py``: the face box of the portrait (from the stored face-mesh
landmarks, padded by ``avatar.wav2lip.pads``, default 0 10 0 0 like the original) is cut out of the frame,
resized to 96×96, BGR in [0, 1]; its lower half is zeroed and the unmasked crop appended as the
reference: ``video`` (B, 6, 96, 96). ``audio`` (B, 1, 80, 16) is the 0.2 s of mel centred on the frame
(wav2lip_audio.py). The generated (B, 3, 96, 96) face is resized back and blended into the lower face
through a feathered mask (0 at the box's edges), so no seam shows and nothing else in the frame changes.

The rest of each frame is the landmark-warp renderer's with the mouth at rest: blinks and the idle head
motion go on while Wav2Lip moves the mouth, and between turns (idle loop, posters) the avatar is the
portrait itself. Frames of a render batch go through the network together, ``batch_size`` at a time,
in the render worker that the CPU scheduler runs the batch in (one intra-op thread by default: one
scheduler slot is one core).

The model file is an ONNX export of the public ``wav2lip_gan.pth`` (docs/wav2lip.md); it is checked at load
(input and output names, shapes, a trial run) and a wrong or missing file is a ``Wav2LipModelError``
that says what is wrong and where the conversion is documented.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from avatarchat.engines.avatar.base import SpeechTrack
from avatarchat.engines.avatar.face import AvatarModel
from avatarchat.engines.avatar.renderer import PAD, SUBNASALE, AvatarRenderer, _smoothstep
from avatarchat.engines.avatar.wav2lip_audio import MEL_STEP, N_MELS, SAMPLE_RATE, mel_windows

if TYPE_CHECKING:
    from avatarchat.config import Wav2LipConfig

FACE = 96
INPUTS = {"audio": (1, N_MELS, MEL_STEP), "video": (6, FACE, FACE)}
OUTPUT = (3, FACE, FACE)
DOC = "docs/wav2lip.md"
_REST = np.zeros(3, np.float32)


class Wav2LipModelError(ValueError):
    """The Wav2Lip model file is missing, unreadable, or not Wav2Lip's inputs and outputs."""


def _dims(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


@dataclass
class Wav2LipModel:
    """A checked ONNX Runtime session of Wav2Lip. ``run`` is thread-safe (ONNX Runtime's ``run`` is)."""

    session: Any
    path: Path
    output: str
    fixed_batch: int | None  # an export without a dynamic batch axis runs this many at a time (padded)

    def run(self, audio: np.ndarray, video: np.ndarray, batch_size: int) -> np.ndarray:
        """audio (N, 1, 80, 16), video (N, 6, 96, 96) float32 → (N, 3, 96, 96) float32 in [0, 1]."""
        n = len(audio)
        step = self.fixed_batch or max(1, batch_size)
        out = []
        for i in range(0, n, step):
            a, v = audio[i : i + step], video[i : i + step]
            k = len(a)
            if self.fixed_batch and k < step:  # pad a short last batch with copies of its last frame
                a = np.concatenate([a, np.repeat(a[-1:], step - k, axis=0)])
                v = np.concatenate([v, np.repeat(v[-1:], step - k, axis=0)])
            y = self.session.run([self.output], {"audio": np.ascontiguousarray(a, np.float32),
                                                 "video": np.ascontiguousarray(v, np.float32)})[0]
            if y.shape[1:] != OUTPUT or len(y) < k:
                raise Wav2LipModelError(f"{self.path} returned {y.shape} for {k} frames; expected ({k}, 3, 96, 96)")
            out.append(y[:k])
        return np.clip(np.concatenate(out), 0.0, 1.0) if out else np.zeros((0, *OUTPUT), np.float32)

    def describe(self) -> str:
        batch = f"fixed batch {self.fixed_batch}" if self.fixed_batch else "dynamic batch"
        return (f"{self.path.name}: audio (B, 1, 80, 16) + video (B, 6, 96, 96) -> {self.output} (B, 3, 96, 96), "
                f"{batch}")


def load_model(path: str | Path | None, threads: int = 1) -> Wav2LipModel:
    """Open and check a Wav2Lip ONNX file: names, shapes and element types, then one trial run."""
    if not path:
        raise Wav2LipModelError(
            "avatar.engine is wav2lip but avatar.wav2lip.model_path is not set: convert wav2lip_gan.pth to ONNX "
            f"({DOC}) and set avatar.wav2lip.model_path to the file")
    p = Path(path).expanduser()
    if not p.is_file():
        raise Wav2LipModelError(f"avatar.wav2lip.model_path {p} does not exist (convert wav2lip_gan.pth to ONNX: {DOC})")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise Wav2LipModelError(f"{p} is not a loadable ONNX model ({type(e).__name__}: {e}); see {DOC}") from e

    want = "inputs audio (B, 1, 80, 16) and video (B, 6, 96, 96), one output (B, 3, 96, 96), float32"
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = session.get_outputs()
    if set(inputs) != set(INPUTS) or len(outputs) != 1:
        found = ", ".join(f"{i.name} {_dims(i.shape)}" for i in session.get_inputs())
        raise Wav2LipModelError(f"{p} has inputs {found} and {len(outputs)} output(s); Wav2Lip needs {want} "
                                f"(export with input_names=['audio', 'video']: {DOC})")
    batches: set[int] = set()
    for name, dims in INPUTS.items():
        node = inputs[name]
        shape = list(node.shape)
        if node.type != "tensor(float)" or len(shape) != 4 or tuple(shape[1:]) != dims:
            raise Wav2LipModelError(f"{p}: input {name} is {node.type} {_dims(shape)}; Wav2Lip needs {want} ({DOC})")
        if isinstance(shape[0], int) and shape[0] > 0:
            batches.add(shape[0])
    out = outputs[0]
    oshape = list(out.shape)
    if out.type != "tensor(float)" or len(oshape) != 4 or any(
        isinstance(d, int) and d != w for d, w in zip(oshape[1:], OUTPUT)
    ):
        raise Wav2LipModelError(f"{p}: output {out.name} is {out.type} {_dims(oshape)}; Wav2Lip needs {want} ({DOC})")
    if len(batches) > 1:
        raise Wav2LipModelError(f"{p}: the inputs have different fixed batch sizes {sorted(batches)} ({DOC})")
    model = Wav2LipModel(session, p, out.name, batches.pop() if batches else None)
    try:  # shapes the graph does not state are checked on a real run
        model.run(np.full((1, 1, N_MELS, MEL_STEP), -4.0, np.float32), np.zeros((1, 6, FACE, FACE), np.float32), 1)
    except Wav2LipModelError:
        raise
    except Exception as e:
        raise Wav2LipModelError(f"{p} failed a trial run on Wav2Lip's input shapes ({type(e).__name__}: {e}); "
                                f"see {DOC}") from e
    return model


class Wav2LipRenderer:
    """The landmark-warp renderer's frames, with Wav2Lip's mouth blended in while there is speech."""

    wants_audio = True

    def __init__(self, avatar: AvatarModel, model: Wav2LipModel, *, fps: int = 25, batch_size: int = 8,
                 pads: tuple[int, int, int, int] = (0, 10, 0, 0), feather: float = 0.06) -> None:
        self.base = AvatarRenderer(avatar, fps=fps)
        self.fps = fps
        self.idle_period_frames = self.base.idle_period_frames
        self.batch_size = batch_size
        self.model = model
        h, w = avatar.image.shape[:2]
        lm = avatar.landmarks[:468].astype(np.float32)
        top, bottom, left, right = pads
        # The face box (the original's detector box + pads), kept PAD px inside the image so it can follow the
        # head's idle motion.
        y0 = int(max(PAD, np.floor(lm[:, 1].min()) - top))
        y1 = int(min(h - PAD, np.ceil(lm[:, 1].max()) + bottom))
        x0 = int(max(PAD, np.floor(lm[:, 0].min()) - left))
        x1 = int(min(w - PAD, np.ceil(lm[:, 0].max()) + right))
        if y1 - y0 < 16 or x1 - x0 < 16:
            raise ValueError(f"avatar {avatar.name!r}: face box {x1 - x0}x{y1 - y0} px is too small for Wav2Lip")
        self.box = (y0, y1, x0, x1)
        self.mask = self._make_mask(y1 - y0, x1 - x0, float(lm[SUBNASALE][1]) - y0, feather)

    @staticmethod
    def _make_mask(h: int, w: int, top: float, feather: float) -> np.ndarray:
        """(h, w) float32: 1 over the lower face (from the base of the nose down), easing to exactly 0 at
        the box's sides and bottom and above the nose: a C1 ramp, so the blend has no edge."""
        f = max(2.0, feather * w)
        ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
        vert = _smoothstep(top - f, top + f, ys) * (1 - _smoothstep(h - 1 - 2 * f, h - 1, ys))
        horiz = _smoothstep(0.0, 2 * f, xs) * _smoothstep(0.0, 2 * f, w - 1 - xs)
        return (vert[:, None] * horiz[None, :]).astype(np.float32)

    @property
    def size(self) -> tuple[int, int]:
        return self.base.size

    def render(self, frame_index: int, mouth: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        """Without speech: the portrait with its idle motion, mouth at rest (idle loop, posters)."""
        return self.base.render(frame_index, _REST, out)

    def idle_frames(self):  # type: ignore[no-untyped-def]
        return self.base.idle_frames()

    def box_at(self, frame_index: int) -> tuple[int, int, int, int]:
        dx, dy = self.base.mouth_shift(frame_index)
        y0, y1, x0, x1 = self.box
        return y0 + dy, y1 + dy, x0 + dx, x1 + dx

    def inputs(self, frames: list[np.ndarray], indices: list[int]) -> np.ndarray:
        """(N, 6, 96, 96) float32: each frame's face crop, lower half zeroed, then the whole crop; BGR in [0, 1]."""
        crops = []
        for image, k in zip(frames, indices):
            y0, y1, x0, x1 = self.box_at(k)
            crops.append(cv2.resize(image[y0:y1, x0:x1], (FACE, FACE), interpolation=cv2.INTER_AREA))
        bgr = np.stack(crops)[..., ::-1].astype(np.float32) / 255.0
        masked = bgr.copy()
        masked[:, FACE // 2 :] = 0.0
        return np.ascontiguousarray(np.concatenate([masked, bgr], axis=3).transpose(0, 3, 1, 2))

    def render_speech(self, frames: list[int] | Any, mouth: np.ndarray, speech: SpeechTrack) -> list[np.ndarray]:
        indices = [int(k) for k in frames]
        if not indices:
            return []
        mel = mel_windows([speech.frame(k) for k in indices], self.fps,
                          lambda n0, n1: speech.resampled(n0, n1, SAMPLE_RATE))
        images = [self.base.render(k, _REST) for k in indices]
        faces = self.model.run(mel[:, None], self.inputs(images, indices), self.batch_size)
        # Only the rows the mask reaches are resized and blended; blendLinear leaves a pixel of weight 0 as it was.
        mask = self.mask
        r0 = int(np.argmax(mask.max(axis=1) > 0))
        weight, keep = np.ascontiguousarray(mask[r0:]), np.ascontiguousarray(1.0 - mask[r0:])
        faces_u8 = (faces.transpose(0, 2, 3, 1)[..., ::-1] * 255.0 + 0.5).astype(np.uint8)  # BGR → RGB
        for image, k, face in zip(images, indices, faces_u8):
            y0, y1, x0, x1 = self.box_at(k)
            gen = cv2.resize(face, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)[r0:]
            region = image[y0 + r0 : y1, x0:x1]
            region[...] = cv2.blendLinear(gen, np.ascontiguousarray(region), weight, keep)
        return images


class Wav2LipEngine:
    """Makes each avatar's ``Wav2LipRenderer``; one checked ONNX session for the process, shared by all."""

    def __init__(self, config: Wav2LipConfig, fps: int) -> None:
        self.config = config
        self.fps = fps
        self._model: Wav2LipModel | None = None
        self._lock = threading.Lock()

    def model(self) -> Wav2LipModel:
        with self._lock:
            if self._model is None:
                self._model = load_model(self.config.model_path, self.config.threads)
            return self._model

    def __call__(self, avatar: AvatarModel) -> Wav2LipRenderer:
        c = self.config
        return Wav2LipRenderer(avatar, self.model(), fps=self.fps, batch_size=c.batch_size, pads=tuple(c.pads),  # type: ignore[arg-type]
                               feather=c.feather)
