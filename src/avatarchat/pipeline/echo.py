"""Is the microphone hearing the avatar? The echo check behind barge-in.

While the avatar speaks, its own voice can reach the microphone (speakers, no echo cancellation). The server
knows exactly what the avatar said and, from the page's playback reports, where playback is. So when speech is
confirmed over the avatar, the check fits the microphone's band energies of the last ~1.5 s as a delayed,
smeared (reverb) and per-band scaled copy of what was playing, then asks how much of the *newest* 0.3 s that
fit leaves unexplained: little (an echo) or most of it (a person talking, even over the echo).

Everything is in band energies (16 ms hops, 10 bands 300–4000 Hz), so it is robust to the room and to Piper
speaking differently each time, and costs about a millisecond per check.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np
from scipy.signal import lfilter, resample_poly

RATE = 16000
HOP = 256  # 16 ms
WIN = 512
HOP_MS = HOP * 1000 / RATE
_EDGES = np.geomspace(300, 4000, 11)
_FREQS = np.fft.rfftfreq(WIN, 1 / RATE)
_BANDS = np.stack([(_FREQS >= lo) & (_FREQS < hi) for lo, hi in zip(_EDGES[:-1], _EDGES[1:])], 1).astype(np.float32)
_WINDOW = np.hanning(WIN).astype(np.float32)
_SMOOTHING = (0.0, 0.5, 0.8)  # reverb: energy decay per hop (none, ~25 ms, ~70 ms)
TEST_FRAMES = round(300 / HOP_MS)
FIT_FRAMES = round(1500 / HOP_MS)
MIN_FIT_FRAMES = round(400 / HOP_MS)
SHRINK = 0.2  # weight of the broadband gain in each band's, as a share of the mean band's reply energy
EARLY_MARGIN = 0.15  # the early fit is cruder: an echo can leave up to ~0.8 unexplained by it


def band_energy(audio: np.ndarray, rate: int = RATE) -> np.ndarray:
    """Band energies (frames × bands) of mono float audio, one frame per 16 ms from its start."""
    if rate != RATE:
        g = math.gcd(rate, RATE)
        audio = resample_poly(audio, RATE // g, rate // g)
    audio = np.asarray(audio, np.float32)
    n = len(audio) // HOP
    if n == 0:
        return np.zeros((0, _BANDS.shape[1]), np.float32)
    padded = np.pad(audio, (0, n * HOP + WIN - len(audio)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, WIN)[::HOP][:n] * _WINDOW
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return (power @ _BANDS).astype(np.float32)


class EchoReference:
    """What the avatar said in one turn, as band energies on the turn's media timeline."""

    def __init__(self) -> None:
        self._bands = np.zeros((0, _BANDS.shape[1]), np.float32)

    def add(self, bands: np.ndarray, start_ms: float) -> None:
        """Place a piece's band energies at ``start_ms`` of the turn's media (pieces come in order)."""
        at = round(start_ms / HOP_MS)
        have = len(self._bands)
        if at > have:
            self._bands = np.concatenate([self._bands, np.zeros((at - have, self._bands.shape[1]), np.float32)])
        self._bands = np.concatenate([self._bands[:at], bands])

    def window(self, lo: int, hi: int) -> np.ndarray:
        """Frames ``lo``..``hi`` (may reach outside the turn: silence there)."""
        out = np.zeros((hi - lo, self._bands.shape[1]), np.float32)
        a, b = max(lo, 0), min(hi, len(self._bands))
        if b > a:
            out[a - lo : b - lo] = self._bands[a:b]
        return out


@dataclass(frozen=True)
class EchoPath:
    """How the avatar's voice reaches this microphone: delay (frames), reverb smoothing and per-band gain."""

    lag: int
    smoothing: float
    gain: np.ndarray


class PlaybackClock:
    """Where playback of one turn was at each microphone sample, from the client's reports (each read at a known
    mic sample). Playback stalls when media runs late, so one straight line from the last report is not enough:
    after a stall the older part of the check's window would be shifted against the reply."""

    def __init__(self, keep: int = 64) -> None:
        self._reports: deque[tuple[int, float, bool]] = deque(maxlen=keep)  # (mic sample, position ms, playing)

    def report(self, mic_samples: int, position_ms: float, playing: bool) -> None:
        if self._reports and mic_samples < self._reports[-1][0]:
            self._reports.clear()  # the client's microphone restarted
        self._reports.append((mic_samples, position_ms, playing))

    def __bool__(self) -> bool:
        return bool(self._reports)

    def known_until(self, now: int) -> int:
        """The newest mic sample whose playback position is known: after a report of a stalled player it may have
        resumed at any time (the next report says), while a playing one is followed by extrapolation."""
        if not self._reports or self._reports[-1][2]:
            return now
        return min(now, self._reports[-1][0])

    def positions(self, samples: np.ndarray) -> np.ndarray:
        """The playback position (ms) at each mic sample in ``samples`` (ascending). Between two reports a
        playing player is assumed to have played, then stalled; a stalled one to have waited, then played."""
        r = np.array(self._reports, dtype=np.float64)
        mic, pos, playing = r[:, 0], r[:, 1], r[:, 2] > 0
        k = np.clip(np.searchsorted(mic, samples, side="right") - 1, 0, len(r) - 1)
        ahead = pos[k] + np.where(playing[k], (samples - mic[k]) / 16, 0.0)
        nxt = np.minimum(k + 1, len(r) - 1)
        has_next = (k + 1 < len(r)) & (samples >= mic[0])
        played_then_stalled = np.minimum(ahead, pos[nxt])
        waited_then_played = np.maximum(pos[k], pos[nxt] - (mic[nxt] - samples) / 16)
        out = np.where(has_next, np.where(playing[k], played_then_stalled, waited_then_played), ahead)
        return np.where(samples < mic[0], pos[0] - np.where(playing[0], (mic[0] - samples) / 16, 0.0), out)


class EchoCheck:
    """One session's echo check. Remembers the last echo path it was sure of, for the start of a reply."""

    def __init__(self, max_lead_ms: float = 200, max_lag_ms: float = 400) -> None:
        self._lags = np.arange(-round(max_lead_ms / HOP_MS), round(max_lag_ms / HOP_MS) + 1)
        self.path: EchoPath | None = None
        self.last_lag_ms: float | None = None  # the delay of the best fit in the last check (for the logs)

    def unexplained(self, mic: np.ndarray, ref: EchoReference, positions_ms: np.ndarray) -> float | None:
        """The share of the newest 0.3 s of ``mic`` (band energies) that the avatar's audio does not explain:
        near 0 for an echo, near 1 for a person. ``positions_ms``: the playback position when each mic frame
        ended. None when too little of the reply has played to tell, and no echo path is known yet."""
        n = min(len(mic), FIT_FRAMES + TEST_FRAMES)
        if n < TEST_FRAMES + 8:
            return None
        m = mic[-n:].astype(np.float64)
        m_fit, m_test = m[:-TEST_FRAMES], m[-TEST_FRAMES:]
        test_energy = m_test.sum()
        if test_energy <= 0:
            return 0.0
        at = np.rint(np.asarray(positions_ms[-n:], np.float64) / HOP_MS).astype(np.int64) - 1  # ref frame per mic frame
        lags = self._lags
        run_in = 32  # frames before the earliest one used, for the smoothing to settle
        lo = int(at.min()) - int(lags[-1]) - run_in
        ref_all = ref.window(lo, int(at.max()) - int(lags[0]) + 1).astype(np.float64)
        idx = at[None, :] - lags[:, None] - lo  # (lags, frames) into ref_all
        # Enough of the reply in the fit even at the longest delay? Else any gain would fit, and the lags that
        # see more of the reply would win for the wrong reason.
        latest = ref_all[idx[-1, :-TEST_FRAMES]].sum(1)
        held_out = latest.any() and np.count_nonzero(latest > 1e-3 * latest.max()) >= MIN_FIT_FRAMES
        if not held_out and self.path is not None:
            p = self.path
            y = _smooth(ref_all, p.smoothing)[at[-TEST_FRAMES:] - p.lag - lo]
            return float(np.maximum(m_test - p.gain * y, 0).sum() / test_energy)
        best: tuple[float, int, float, np.ndarray] | None = None
        for a in _SMOOTHING:
            y = _smooth(ref_all, a)[idx]  # every lag's window at once: (lags, frames, bands)
            y_test = y[:, -TEST_FRAMES:]
            if held_out:  # per-band gains fitted on the older part, tested on the newest
                y_fit = y[:, :-TEST_FRAMES]
                # Per band, pulled toward the broadband gain where the band had little of the reply to go on.
                my, yy = (m_fit * y_fit).sum(1), (y_fit * y_fit).sum(1)
                broadband = my.sum(1, keepdims=True) / np.maximum(yy.sum(1, keepdims=True), 1e-12)
                prior = SHRINK * yy.mean(1, keepdims=True)
                gain = (my + prior * broadband) / np.maximum(yy + prior, 1e-12)
            else:  # early in a reply: one broadband gain over the whole window (too few parameters to fit a voice)
                gain = ((m * y).sum((1, 2)) / np.maximum((y * y).sum((1, 2)), 1e-12))[:, None]
            left = np.maximum(m_test - np.maximum(gain, 0)[:, None, :] * y_test, 0).sum((1, 2)) / test_energy
            if not held_out:
                left[~y_test.any((1, 2))] = np.inf  # nothing of the reply in the newest part: no evidence
            k = int(np.argmin(left))
            if best is None or left[k] < best[0]:
                self.last_lag_ms = float(lags[k] * HOP_MS)
                best = (float(left[k]), int(lags[k]), a, np.broadcast_to(np.maximum(gain[k], 0), (m.shape[1],)).copy())
        assert best is not None
        if not np.isfinite(best[0]):
            return None
        if not held_out:
            return max(0.0, best[0] - EARLY_MARGIN)
        if best[0] < 0.3:
            self.path = EchoPath(best[1], best[2], best[3])
        return best[0]


def _smooth(bands: np.ndarray, a: float) -> np.ndarray:
    """Reverb as an exponential decay of energy, ``a`` per hop."""
    return lfilter([1 - a], [1, -a], bands, axis=0) if a else bands


# Words too common to tell the avatar's sentences from the person's: they do not count either way.
_COMMON = frozenset("""a an and are as at be but by can do for from has have he her his i if in is it its me my no
not of on or our she so that the their them then there they this to us was we were what when where which who will
with would you your oh um uh""".split())  # not "no", "yes": a barge-in can be just that
_TOKEN = re.compile(r"[a-z0-9']{2,}|[\u3400-\u9fff]")
_ALIKE = 0.7  # Whisper hears an echo's words a little wrong: knight→night, sea→seat, castle→castled


def own_words_share(transcript: str, said: str) -> float | None:
    """The share of a transcript's telling words (Chinese: characters) that the avatar said, or nearly: near 1
    when the microphone heard the avatar's own voice, low when the person says something of their own. None: no
    telling words (silence, a hum, only common words)."""
    heard = [w for w in _TOKEN.findall(transcript.lower()) if w not in _COMMON]
    if not heard:
        return None
    own = set(_TOKEN.findall(said.lower()))
    telling = own - _COMMON  # "brand" holds "and", but is no echo of it

    def owned(w: str) -> bool:
        return w in own or (len(w) >= 4 and any(SequenceMatcher(None, w, v).ratio() >= _ALIKE for v in telling))

    return sum(map(owned, heard)) / len(heard)
