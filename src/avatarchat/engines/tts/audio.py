"""Compressed speech from a remote voice, decoded for the video: PyAV (FFmpeg) reads any container and
codec a TTS service sends (wav, mp3, flac, opus, aac) and resamples it in the same pass."""

from __future__ import annotations

import io

import numpy as np


class AudioDecodeError(ValueError):
    """The bytes are not audio PyAV can read; the message says why."""


def decode_audio(data: bytes, rate: int, fmt: str | None = None) -> np.ndarray:
    """``data`` as mono float32 in [-1, 1] at ``rate`` Hz (empty if it holds no samples)."""
    import av

    parts: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), format=fmt) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(audio=0):
                parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise AudioDecodeError(str(e)) from e
    if not parts:
        return np.zeros(0, np.float32)
    return np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32, copy=False)
