"""Speech → one row of mouth parameters per video frame.

Columns: ``open`` in [0, 1] (jaw and lip opening), ``wide`` in [-1, 1] (+ spread as in "ee",
- rounded as in "oo"), ``press`` in [0, 1] (lips pressed together, as for m/b/p; half for f/v).
Targets come from the phonemes (IPA, as espeak spells them) when the TTS engine gives timings,
blended across neighbours (coarticulation) and gated by the audio envelope, so the mouth is closed
wherever the audio is silent. Without timings the audio envelope and spectrum drive it.
"""

from __future__ import annotations

import numpy as np

from avatarchat.engines.types import Speech

OPEN, WIDE, PRESS = 0, 1, 2
REST = (0.0, 0.0, 0.0)

_VISEMES: dict[str, tuple[float, float, float]] = {}


def _set(chars: str, target: tuple[float, float, float]) -> None:
    for ch in chars:
        _VISEMES[ch] = target


_set("aɑæɐɒʌ", (0.95, 0.15, 0.0))
_set("ɛeɜɚɝ", (0.6, 0.35, 0.0))
_set("ə", (0.45, 0.1, 0.0))
_set("iɪjy", (0.3, 0.85, 0.0))
_set("oɔɵ", (0.65, -0.6, 0.0))
_set("uʊwɯ", (0.3, -0.95, 0.0))
_set("ɹr", (0.3, -0.35, 0.0))
_set("mbp", (0.0, 0.0, 1.0))
_set("fv", (0.1, 0.1, 0.55))
_set("θð", (0.25, 0.15, 0.0))
_set("tdnlɾszkgŋhxʔɡç", (0.3, 0.15, 0.0))
_set("ʃʒ", (0.3, -0.5, 0.0))
# Mandarin sounds (engines/tts/pinyin.py) not covered above.
_set("ɤ", (0.5, 0.05, 0.0))
_set("ɨ", (0.25, 0.4, 0.0))
_set("ɥ", (0.3, -0.85, 0.0))
_set("ɻ", (0.3, -0.35, 0.0))
_set("ɕ", (0.3, 0.5, 0.0))
_set("ʈ", (0.3, 0.15, 0.0))
_set("ʂʐ", (0.3, -0.45, 0.0))
# Marks that belong to a neighbour: stress before a vowel, length after it, word gaps inside speech.
_TRANSPARENT = set("ˈˌːˑ ‿")
_PAUSE = set("^$_.,!?;:…—-\"'()")

_SMOOTH_S = 0.035  # coarticulation time constant


def _target(phoneme: str) -> tuple[float, float, float] | None:
    """The viseme of a phoneme, or None when it takes its neighbours' shape."""
    if not phoneme or all(ch in _TRANSPARENT for ch in phoneme):
        return None
    if all(ch in _PAUSE or ch.isspace() for ch in phoneme):
        return REST
    for ch in phoneme:  # multi-character phonemes (tʃ, aɪ): the first known sound leads
        if ch in _VISEMES:
            return _VISEMES[ch]
    return (0.3, 0.1, 0.0)  # an unknown sound: a neutral half-open mouth


def envelope(audio: np.ndarray, sample_rate: int, fps: int, n_frames: int) -> np.ndarray:
    """RMS per frame, normalized so that loud speech is about 1."""
    hop = sample_rate / fps
    rms = np.zeros(n_frames, np.float32)
    for k in range(n_frames):
        seg = audio[int(k * hop) : int((k + 1) * hop)]
        if len(seg):
            rms[k] = float(np.sqrt(np.mean(np.square(seg, dtype=np.float32))))
    ref = float(np.percentile(rms, 90)) if n_frames else 0.0
    return rms / ref if ref > 1e-4 else np.zeros(n_frames, np.float32)


def _smooth(x: np.ndarray, fps: int) -> np.ndarray:
    """Zero-phase exponential smoothing along time (forward, then backward)."""
    a = float(np.exp(-1.0 / (fps * _SMOOTH_S)))
    y = x.astype(np.float32).copy()
    for k in range(1, len(y)):
        y[k] = a * y[k - 1] + (1 - a) * y[k]
    for k in range(len(y) - 2, -1, -1):
        y[k] = a * y[k + 1] + (1 - a) * y[k]
    return y


def _phoneme_targets(speech: Speech, fps: int, n_frames: int) -> np.ndarray:
    assert speech.phonemes is not None
    # Resolve transparent marks to the next real sound (stress precedes its vowel), else the previous one.
    resolved: list[tuple[float, float, tuple[float, float, float] | None]] = [
        (p.start, p.end, _target(p.phoneme)) for p in speech.phonemes
    ]
    nxt: tuple[float, float, float] | None = None
    for i in range(len(resolved) - 1, -1, -1):
        s, e, t = resolved[i]
        if t is None:
            resolved[i] = (s, e, nxt)
        else:
            nxt = t
    prev: tuple[float, float, float] = REST
    for i, (s, e, t) in enumerate(resolved):
        if t is None:
            resolved[i] = (s, e, prev)
        else:
            prev = t
    out = np.zeros((n_frames, 3), np.float32)
    weight = np.zeros(n_frames, np.float32)
    for s, e, t in resolved:
        if t is None or e <= s:
            continue
        k0, k1 = int(s * fps), min(n_frames - 1, int(e * fps))
        for k in range(max(0, k0), k1 + 1):
            overlap = min(e, (k + 1) / fps) - max(s, k / fps)
            if overlap > 0:
                out[k] += overlap * np.asarray(t, np.float32)
                weight[k] += overlap
    covered = weight > 0
    out[covered] /= weight[covered, None]
    return out


def _spectral_wide(audio: np.ndarray, sample_rate: int, fps: int, n_frames: int) -> np.ndarray:
    """Without phonemes: bright sounds (i, s) spread the lips, dark ones (u, o) round them."""
    hop = sample_rate / fps
    wide = np.zeros(n_frames, np.float32)
    freqs: np.ndarray | None = None
    for k in range(n_frames):
        seg = audio[int(k * hop) : int((k + 1) * hop)]
        if len(seg) < 32:
            continue
        spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
        if freqs is None or len(freqs) != len(spec):
            freqs = np.fft.rfftfreq(len(seg), 1 / sample_rate)
        total = float(spec.sum())
        if total > 1e-6:
            centroid = float((freqs * spec).sum() / total)
            wide[k] = np.clip((centroid - 1600.0) / 1200.0, -1.0, 1.0) * 0.6
    return wide


def mouth_track(speech: Speech, fps: int, n_frames: int) -> np.ndarray:
    """(n_frames, 3) float32: open, wide, press for frame k covering [k/fps, (k+1)/fps)."""
    if n_frames <= 0:
        return np.zeros((0, 3), np.float32)
    audio = np.asarray(speech.audio, np.float32)
    env = envelope(audio, speech.sample_rate, fps, n_frames)
    gate = np.clip(env * 2.0, 0.0, 1.0)  # silence closes the mouth, quiet speech narrows it
    if speech.phonemes:
        targets = _phoneme_targets(speech, fps, n_frames)
        track = np.stack([_smooth(targets[:, c], fps) for c in range(3)], axis=1)
        track[:, OPEN] *= np.sqrt(gate) * np.clip(0.55 + 0.45 * env, 0.0, 1.15)
    else:
        track = np.zeros((n_frames, 3), np.float32)
        track[:, OPEN] = _smooth(np.clip(env, 0.0, 1.2) ** 0.8 * 0.85, fps)
        track[:, WIDE] = _smooth(_spectral_wide(audio, speech.sample_rate, fps, n_frames) * gate, fps)
    track[:, WIDE] *= _smooth(gate, fps)
    track[:, OPEN] = np.clip(track[:, OPEN], 0.0, 1.0)
    track[:, WIDE] = np.clip(track[:, WIDE], -1.0, 1.0)
    track[:, PRESS] = np.clip(track[:, PRESS], 0.0, 1.0)
    return track.astype(np.float32)
