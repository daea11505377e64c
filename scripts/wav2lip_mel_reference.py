"""Make tests/support/wav2lip_mel_reference.npy: Wav2Lip's own mel front end (its audio.py with hparams.py's
defaults, on librosa) applied to a fixed 0.5 s signal. tests/test_wav2lip.py checks the numpy front end
(engines/avatar/wav2lip_audio.py) against it. librosa is not a dependency of the project: run this in a
separate environment (`python -m venv /tmp/lv && /tmp/lv/bin/pip install librosa scipy`).

    /tmp/lv/bin/python scripts/wav2lip_mel_reference.py
"""

from pathlib import Path

import librosa
import numpy as np
from scipy import signal


def wav2lip_melspectrogram(wav: np.ndarray) -> np.ndarray:
    y = signal.lfilter([1, -0.97], [1], wav)  # preemphasis
    d = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s = 20 * np.log10(np.maximum(1e-5, basis @ np.abs(d))) - 20  # _amp_to_db - ref_level_db
    return np.clip(8 * ((s + 100) / 100) - 4, -4, 4)  # symmetric normalization, max_abs_value 4


def reference_signal() -> np.ndarray:
    t = np.arange(8000) / 16000
    chirp = 0.25 * np.sin(2 * np.pi * (150 * t + 3000 * t * t)) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    return chirp * np.sin(np.pi * t / 0.5)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "tests" / "support" / "wav2lip_mel_reference.npy"
    np.save(out, wav2lip_melspectrogram(reference_signal()).astype(np.float32))
    print(f"wrote {out} (librosa {librosa.__version__})")
