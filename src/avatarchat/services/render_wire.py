"""The render API's binary batch body, shared by the gateway (services/render_client.py) and the avatar
service (server/render_api.py).

A batch body is the mouth rows then the audio, raw little-endian float32: ``frames`` rows of
``MOUTH_COLUMNS`` values, then ``samples`` mono PCM samples. The counts travel in headers, so the
body needs no parsing beyond a length check and two ``np.frombuffer`` views.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FRAMES = "x-render-frames"  # request: mouth rows in the body; response: video frames in the stream so far
FIRST_FRAME = "x-render-first-frame"  # the avatar's frame index of the first row (idle motion continues across turns)
SAMPLES = "x-render-samples"  # audio samples after the mouth rows
DUE_MS = "x-render-due-ms"  # optional: the gateway's player needs these frames in this many ms (the deadline)
MAX_DUE_MS = 3_600_000
MOUTH_COLUMNS = 3  # open, wide, press (engines/avatar/visemes.py)
_F32 = np.dtype("<f4")
MAX_FIRST_FRAME = 2**31 - 1


class RenderRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def pack_batch(mouth: np.ndarray, first_frame: int, audio: np.ndarray | None) -> tuple[dict[str, str], bytes]:
    rows = np.ascontiguousarray(mouth, _F32).reshape(-1, MOUTH_COLUMNS)
    pcm = np.ascontiguousarray(audio if audio is not None else np.zeros(0, _F32), _F32).reshape(-1)
    headers = {FRAMES: str(len(rows)), FIRST_FRAME: str(first_frame), SAMPLES: str(len(pcm)),
               "content-type": "application/octet-stream"}
    return headers, rows.tobytes() + pcm.tobytes()


def max_body(max_frames: int, max_samples: int) -> int:
    return (max_frames * MOUTH_COLUMNS + max_samples) * _F32.itemsize


def _count(headers: Mapping[str, str], name: str, limit: int) -> int:
    raw = headers.get(name)
    if raw is None or not raw.isdigit() or len(raw) > 12:
        raise RenderRequestError(400, f"header {name} must be a non-negative integer")
    value = int(raw)
    if value > limit:
        raise RenderRequestError(413, f"{name} {value} is over the limit of {limit}")
    return value


def batch_shape(headers: Mapping[str, str], max_frames: int, max_samples: int) -> tuple[int, int, int]:
    """(frames, first frame, samples) from the headers, checked against the limits: before the body is read."""
    frames = _count(headers, FRAMES, max_frames)
    if frames == 0:
        raise RenderRequestError(400, f"a batch needs at least one mouth row ({FRAMES} >= 1)")
    return frames, _count(headers, FIRST_FRAME, MAX_FIRST_FRAME), _count(headers, SAMPLES, max_samples)


def due_ms(headers: Mapping[str, str]) -> int | None:
    """The optional deadline header; absent: None (the batch is due as it comes)."""
    if headers.get(DUE_MS) is None:
        return None
    return _count(headers, DUE_MS, MAX_DUE_MS)


def unpack_batch(body: bytes, frames: int, samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    want = (frames * MOUTH_COLUMNS + samples) * _F32.itemsize
    if len(body) != want:
        raise RenderRequestError(
            400, f"body is {len(body)} bytes; {frames} mouth rows and {samples} samples of float32 take {want}")
    data = np.frombuffer(body, _F32)
    mouth = data[: frames * MOUTH_COLUMNS].reshape(frames, MOUTH_COLUMNS)
    audio = data[frames * MOUTH_COLUMNS :]
    if not np.isfinite(data).all():
        raise RenderRequestError(400, "mouth rows and audio must be finite numbers")
    if np.abs(mouth).max() > 4.0:  # the renderer's coefficients are about 0..1; far outside, the warp tears
        raise RenderRequestError(400, "mouth values must be within -4..4")
    return mouth, (audio if samples else None)
