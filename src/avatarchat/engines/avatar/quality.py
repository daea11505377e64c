"""How believable a rendered face is, measured on the frames themselves (issue 15): by MediaPipe's face
mesh run on the output, not by the renderer's own idea of what it drew.

- ``lip_sync``: the correlation between the speech's loudness and the mouth opening seen in the frames.
- ``seam``: the image gradient along the border of what a frame changed, over the source photo's there.
- ``interior``: whether an open mouth shows teeth and tongue rather than a flat dark hole.
- ``eye_openness``: lid gap over eye width as MediaPipe sees it (its eye model leans towards open eyes, the
  more so in dark, low-contrast photos), and ``lid_cover``: how much of the open eye's area a frame shows
  as skin, to see that a blink closes the lids.

Blocking and slow (MediaPipe: ~5 ms a frame): for benchmarks and tests, never the live path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from avatarchat.engines.avatar.renderer import EYES, INNER_LOWER, INNER_UPPER

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
UPPER_LIP, LOWER_LIP, CHIN, FOREHEAD = 13, 14, 152, 10
EYE_LIDS = ((159, 145, 33, 133), (386, 374, 263, 362))  # upper, lower, corner, corner


class FaceTracker:
    """MediaPipe face mesh (with lips and irises) over a sequence of RGB frames."""

    def __init__(self, video: bool = True) -> None:
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.5
        )

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        h, w = frame.shape[:2]
        return np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark], np.float32)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def mouth_opening(lm: np.ndarray) -> float:
    """The inner lips' gap over the face's height."""
    return float(np.linalg.norm(lm[LOWER_LIP] - lm[UPPER_LIP]) / np.linalg.norm(lm[CHIN] - lm[FOREHEAD]))


def eye_openness(lm: np.ndarray) -> float:
    """Mean over both eyes of the lid gap over the eye's width."""
    return float(np.mean([np.linalg.norm(lm[a] - lm[b]) / np.linalg.norm(lm[c] - lm[d]) for a, b, c, d in EYE_LIDS]))


# Each eye's outline: a corner, the upper lid, the other corner, the lower lid back.
EYE_RINGS = tuple([c0, *upper, c1, *lower[::-1]] for (c0, c1), upper, lower in EYES)


def lid_cover(frame: np.ndarray, lm: np.ndarray, tolerance: float = 0.25) -> float:
    """The share of the open eyes' area (``lm``: landmarks of the face with open eyes; the lid margins left
    out) whose colour in ``frame`` is within ``tolerance`` (relative) of the skin around the eyes: low for
    open eyes (white, iris), near 1 for closed lids."""
    h, w = frame.shape[:2]
    shares = []
    for ring in EYE_RINGS:
        pts = np.round(lm[ring]).astype(np.int32)
        eye = np.zeros((h, w), np.uint8)
        cv2.fillPoly(eye, [pts], 1)
        size = max(3, int(0.6 * (lm[ring][:, 1].max() - lm[ring][:, 1].min())))
        around = cv2.dilate(eye, np.ones((2 * size + 1, 2 * size + 1), np.uint8)) - cv2.dilate(eye, np.ones((size, size), np.uint8))
        ring_px = frame[around > 0].astype(np.float32)
        y = ring_px @ LUMA
        skin = np.median(ring_px[y >= np.median(y)], axis=0)  # skin, not lashes, brows or a frame of glasses
        inside = frame[cv2.erode(eye, np.ones((5, 5), np.uint8)) > 0].astype(np.float32)
        if not len(inside):
            continue
        shares.append(float((np.linalg.norm(inside - skin, axis=1) < tolerance * np.linalg.norm(skin)).mean()))
    return float(np.mean(shares)) if shares else 0.0


def loudness(audio: np.ndarray, rate: int, fps: int, frames: int) -> np.ndarray:
    """RMS of the audio in each video frame's span."""
    per = rate / fps
    return np.array([
        float(np.sqrt(np.mean(np.square(audio[round(k * per) : round((k + 1) * per)], dtype=np.float64)) + 1e-12))
        for k in range(frames)
    ])


def lip_sync(envelope: np.ndarray, opening: np.ndarray, max_lag: int = 2) -> tuple[float, int]:
    """Pearson correlation of loudness and opening, the best over lags of up to ``max_lag`` frames (a mouth
    moves a little before its sound); returns (r, lag in frames, + when the mouth leads)."""
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        a = envelope[lag:] if lag >= 0 else envelope[:lag]
        b = opening[: len(opening) - lag] if lag >= 0 else opening[-lag:]
        n = min(len(a), len(b))
        if n < 3 or np.std(a[:n]) == 0 or np.std(b[:n]) == 0:
            continue
        r = float(np.corrcoef(a[:n], b[:n])[0, 1])
        best = max(best, (r, lag))
    return best


def _gradient(image: np.ndarray) -> np.ndarray:
    y = image.astype(np.float32) @ LUMA
    return cv2.magnitude(cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3))


def seam(frame: np.ndarray, rest: np.ndarray, source: np.ndarray, threshold: float = 6.0) -> float | None:
    """How much sharper the border of the changed region is than the source photo there: the mean gradient
    on a 3 px band along the outer border of the pixels that differ from ``rest`` (the same pose with the
    mouth at rest) by more than ``threshold`` levels, over the mean gradient of ``source`` on that band.
    ~1: no seam; a pasted patch with a hard edge gives 2 or more. None: nothing changed."""
    changed = (np.abs(frame.astype(np.int16) - rest.astype(np.int16)).max(axis=2) > threshold).astype(np.uint8)
    if changed.sum() < 20:
        return None
    # The outer border only: fill the changed region's holes (the mouth's inside is not a seam).
    contours, _ = cv2.findContours(changed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(changed)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    kernel = np.ones((3, 3), np.uint8)
    band = cv2.dilate(filled, kernel, iterations=2) - cv2.erode(filled, kernel, iterations=1)
    band = band.astype(bool)
    ours, theirs = _gradient(frame)[band].mean(), _gradient(source)[band].mean()
    return float(ours / max(theirs, 1.0))


@dataclass(frozen=True)
class Interior:
    pixels: int  # inside the inner lips
    teeth: float  # share of them that look like teeth (bright, not saturated)
    tongue: float  # share that look like tongue (red, not dark)
    spread: float  # std of their luma

    @property
    def textured(self) -> bool:
        """Teeth (at least 15 % of the area) and, with the tongue, most of it: not a flat dark hole, or one
        shaded red."""
        return self.teeth >= 0.15 and self.teeth + self.tongue >= 0.4 and self.spread >= 10.0


def interior(frame: np.ndarray, lm: np.ndarray) -> Interior:
    """What the open mouth shows between the inner lips found on the frame."""
    h, w = frame.shape[:2]
    poly = np.round(np.concatenate([lm[INNER_UPPER], lm[INNER_LOWER][::-1]])).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [poly], 1)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))  # not the lips' own edge
    px = frame[mask > 0].astype(np.float32)
    if len(px) < 10:
        return Interior(len(px), 0.0, 0.0, 0.0)
    # Judged against the lips around the opening, so that neither the photo's light, the skin's tone nor a
    # webcam's warm cast changes what counts as a tooth: brighter than the lips and no more colourful.
    ring = cv2.dilate(mask, np.ones((7, 7), np.uint8)) - cv2.dilate(mask, np.ones((3, 3), np.uint8))
    lips = np.median(frame[ring > 0].astype(np.float32), axis=0)
    lip_y, lip_sat = float(lips @ LUMA), float((lips.max() - lips.min()) / max(float(lips.max()), 1.0))
    y = px @ LUMA
    sat = (px.max(axis=1) - px.min(axis=1)) / np.maximum(px.max(axis=1), 1.0)
    teeth = (y >= 1.1 * lip_y) & (sat <= max(lip_sat, 0.2))
    tongue = (px[:, 0] > 1.3 * px[:, 1]) & (y >= 0.55 * lip_y) & ~teeth
    return Interior(len(px), float(teeth.mean()), float(tongue.mean()), float(y.std()))


def track(frames: Iterable[np.ndarray]) -> list[np.ndarray | None]:
    with FaceTracker() as tracker:
        return [tracker.landmarks(f) for f in frames]
