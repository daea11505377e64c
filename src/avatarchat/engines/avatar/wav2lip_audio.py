"""Wav2Lip's audio front end in numpy: 80-band mel spectrograms, 16 kHz, 80 frames a second.

The same numbers as Wav2Lip's ``hparams.py`` / ``audio.py`` (Prajwal et al. 2020), which used librosa:
pre-emphasis 0.97; STFT with n_fft = win = 800 (a periodic Hann window), hop 200; magnitude (not power)
through 80 Slaney-style mel filters (librosa's default, area-normalized) from 55 to 7600 Hz; dB with a
floor of -100 dB, minus ref_level_db 20; then the symmetric normalization to [-4, 4].

``melspectrogram`` is the original's whole-signal function (centred frames, reflect padding).
``mel_windows`` is what the renderer uses while streaming: for each video frame, the 16 mel frames
(0.2 s) centred on it, computed from the speech audio around it only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS = 4.0
MEL_STEP = 16  # mel frames per window: 0.2 s
MEL_FPS = SAMPLE_RATE / HOP  # 80
# Training (wav2lip_train.py) takes frame i's window from frame i - 2 on: five 25 fps frames centred on it.
WINDOW_LEAD_S = 2 / 25


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """(80, 401) float32: librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)."""
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array(FMIN)), _hz_to_mel(np.array(FMAX)), N_MELS + 2))
    fft_f = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_f[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    n = np.arange(WIN)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / WIN)).astype(np.float32)  # periodic Hann (scipy's fftbins=True)


def preemphasis(wav: np.ndarray, previous: float = 0.0) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] (scipy.signal.lfilter([1, -0.97], [1], x)); ``previous`` is x[-1]."""
    x = np.asarray(wav, np.float32)
    out = x.copy()
    if len(x):
        out[0] -= PREEMPHASIS * previous
        out[1:] -= PREEMPHASIS * x[:-1]
    return out


def _mel_from_frames(frames: np.ndarray) -> np.ndarray:
    """(T, 800) pre-emphasized samples → (80, T) normalized mel."""
    spec = np.abs(np.fft.rfft(frames * _window(), n=N_FFT, axis=1)).astype(np.float32)  # (T, 401)
    mel = mel_basis() @ spec.T
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    norm = 2 * MAX_ABS * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS
    return np.clip(norm, -MAX_ABS, MAX_ABS).astype(np.float32)


def _frames(padded: np.ndarray, count: int) -> np.ndarray:
    idx = np.arange(count)[:, None] * HOP + np.arange(N_FFT)[None, :]
    return padded[idx]


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's ``audio.melspectrogram`` of a whole 16 kHz signal: (80, 1 + len // 200), in [-4, 4]."""
    y = preemphasis(np.asarray(wav, np.float32))
    pad = N_FFT // 2
    mode = "reflect" if len(y) > pad else "constant"
    padded = np.pad(y, pad, mode=mode)
    return _mel_from_frames(_frames(padded, 1 + len(y) // HOP))


def window_start(frame: int, fps: float) -> int:
    """The first mel frame of video frame ``frame``'s window (frames counted from the audio's start)."""
    return math.floor(MEL_FPS * (frame / fps - WINDOW_LEAD_S) + 1e-6)


def mel_windows(frames: Sequence[int], fps: float, audio16k: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """(len(frames), 80, 16) float32: each video frame's 0.2 s of mel, centred on it.

    ``audio16k(n0, n1)`` returns the 16 kHz samples [n0, n1) of the speech, sample 0 being where
    frame 0 starts (zeros before the start and wherever the audio is not known). Mel frame m is the
    STFT frame centred on sample 200·m, as in the whole-signal ``melspectrogram``.
    """
    if not len(frames):
        return np.zeros((0, N_MELS, MEL_STEP), np.float32)
    starts = [window_start(f, fps) for f in frames]
    m0, m1 = min(starts), max(starts) + MEL_STEP
    n0 = m0 * HOP - N_FFT // 2
    raw = np.asarray(audio16k(n0 - 1, (m1 - 1) * HOP + N_FFT // 2), np.float32)
    y = preemphasis(raw[1:], float(raw[0]))
    mel = _mel_from_frames(_frames(y, m1 - m0))
    return np.stack([mel[:, s - m0 : s - m0 + MEL_STEP] for s in starts])
