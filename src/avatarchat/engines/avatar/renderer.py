"""The 2D avatar renderer: warps the real face of a portrait along its face-mesh landmarks.

Everything heavy is precomputed per avatar as backward displacement fields over regions of interest:
the jaw/lip opening, lip spreading/rounding, lip pressing, and an eyelid field per eye; plus a head
weight that fades to zero before the region's border, so warps never leave seams. A frame is one
``cv2.remap`` of the head region with map = grid − Σ coefficient·field, then anti-aliased shading of the
oral cavity where a pixel's source lies across the lip line (the gap that opens between the lips).
Idle life (blinks, small head motion) is a periodic function of the frame index, so the idle loop
is seamless and motion continues across pieces of speech.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from avatarchat.engines.avatar.face import AvatarModel

# MediaPipe face-mesh indices.
MOUTH_LEFT, MOUTH_RIGHT = 61, 291
INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
INNER_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
OUTER_UPPER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
OUTER_LOWER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
CHIN, FOREHEAD, SUBNASALE = 152, 10, 2
JAW_LEFT, JAW_RIGHT = 172, 397
EYES = (
    # corners, upper lid, lower lid
    ((33, 133), [246, 161, 160, 159, 158, 157, 173], [7, 163, 144, 145, 153, 154, 155]),
    ((263, 362), [466, 388, 387, 386, 385, 384, 398], [249, 390, 373, 374, 380, 381, 382]),
)

PAD = 4  # px of margin on the mouth/eye fields, so they can follow the head by up to PAD px
JAW_DROP = 0.25  # full opening, as a fraction of the mouth width
WIDE_GAIN = 0.16
CAVITY = np.array([46, 16, 20], np.float32)
TONGUE = np.array([158, 72, 78], np.float32)
TEETH = np.array([226, 222, 212], np.float32)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass(frozen=True)
class _Rect:
    y0: int
    y1: int
    x0: int
    x1: int

    def padded(self, pad: int) -> _Rect:
        return _Rect(self.y0 - pad, self.y1 + pad, self.x0 - pad, self.x1 + pad)

    def within(self, outer: _Rect) -> tuple[slice, slice]:
        """This rect's slices inside ``outer``'s coordinates."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = np.mgrid[self.y0 : self.y1, self.x0 : self.x1].astype(np.float32)
        return xs, ys


class _Frame:
    """Local coordinates (u along, v across/down) of a feature, rotated with the face's roll."""

    def __init__(self, center: np.ndarray, angle: float) -> None:
        self.c = center.astype(np.float32)
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def uv(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.c[0], y - self.c[1]
        return dx * self.cos + dy * self.sin, -dx * self.sin + dy * self.cos

    def to_xy(self, du: np.ndarray, dv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A displacement in (u, v) as (dx, dy), float32."""
        return (du * self.cos - dv * self.sin).astype(np.float32), (du * self.sin + dv * self.cos).astype(np.float32)


def _edge_taper(shape: tuple[int, int], margin: float) -> np.ndarray:
    """1 inside, falling to exactly 0 within PAD + 1 px of the padded rect's edge: fields leave no seam."""
    h, w = shape
    ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32) - PAD - 1
    xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32) - PAD - 1
    return np.minimum(_smoothstep(0.0, margin, ys)[:, None], _smoothstep(0.0, margin, xs)[None, :]).astype(np.float32)


def _curve(frame: _Frame, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v = frame.uv(pts[:, 0], pts[:, 1])
    order = np.argsort(u)
    return u[order], v[order]


class AvatarRenderer:
    def __init__(self, model: AvatarModel, fps: int = 25, idle_period_frames: int = 200) -> None:
        self.model = model
        self.fps = fps
        self.idle_period_frames = idle_period_frames
        img = np.ascontiguousarray(model.image)
        self._image = img
        h, w = img.shape[:2]
        lm = model.landmarks.astype(np.float32)
        self._face_h = float(np.linalg.norm(lm[CHIN] - lm[FOREHEAD]))
        self._build_head(lm, w, h)
        self._build_mouth(lm)
        self._build_eyes(lm)
        self._build_idle()

    @property
    def size(self) -> tuple[int, int]:
        return self._image.shape[1], self._image.shape[0]

    # -- precomputation -------------------------------------------------------------------------

    def _build_head(self, lm: np.ndarray, w: int, h: int) -> None:
        center = lm.mean(axis=0)
        fw = float(lm[:, 0].max() - lm[:, 0].min())
        rx, ry = 0.5 * fw * 1.5, 0.5 * self._face_h * 1.55
        # The ellipse reaches past the hair; the weight is 1 inside and 0 at 1.3 radii, inside the ROI.
        y0, y1 = int(max(0, center[1] - 1.35 * ry)), int(min(h, center[1] + 1.35 * ry))
        x0, x1 = int(max(0, center[0] - 1.35 * rx)), int(min(w, center[0] + 1.35 * rx))
        self._roi = _Rect(y0, y1, x0, x1)
        gx, gy = self._roi.grid()
        d = np.sqrt(((gx - center[0]) / rx) ** 2 + ((gy - center[1]) / ry) ** 2)
        weight = (1 - _smoothstep(0.9, 1.3, d)).astype(np.float32)
        # Rotation pivots at the neck, below the chin.
        self._pivot = lm[CHIN] + np.array([0, 0.35 * self._face_h], np.float32)
        self._gx, self._gy = gx, gy
        self._hw = weight
        self._hx = (weight * (gx - self._pivot[0])).astype(np.float32)
        self._hy = (weight * (gy - self._pivot[1])).astype(np.float32)

    def _build_mouth(self, lm: np.ndarray) -> None:
        left, right = lm[MOUTH_LEFT], lm[MOUTH_RIGHT]
        mw = float(np.linalg.norm(right - left)) / 2
        frame = _Frame((left + right) / 2, math.atan2(right[1] - left[1], right[0] - left[0]))
        self._mouth_center = frame.c
        uu, vu = _curve(frame, lm[INNER_UPPER])
        ul, vl = _curve(frame, lm[INNER_LOWER])
        inner_hw = float(max(abs(uu[0]), abs(uu[-1]))) or mw
        _, chin_v = frame.uv(lm[CHIN][0], lm[CHIN][1])
        _, nose_v = frame.uv(lm[SUBNASALE][0], lm[SUBNASALE][1])
        jaw_hw = float(np.linalg.norm(lm[JAW_RIGHT] - lm[JAW_LEFT])) / 2
        below_chin = 0.16 * self._face_h

        # The region: from above the nose base to below the chin, a little wider than the jaw.
        pts = np.array([lm[SUBNASALE], lm[CHIN], lm[JAW_LEFT], lm[JAW_RIGHT]], np.float32)
        rect = _Rect(
            int(pts[:, 1].min() - 0.05 * self._face_h),
            int(lm[CHIN][1] + below_chin * 1.6),
            int(min(pts[:, 0].min(), left[0] - mw) - 0.1 * mw),
            int(max(pts[:, 0].max(), right[0] + mw) + 0.1 * mw),
        )
        rect = self._clip(rect)
        self._mouth_rect = rect
        gx, gy = rect.padded(PAD).grid()
        u, v = frame.uv(gx, gy)
        upper = np.interp(u, uu, vu).astype(np.float32)
        lower = np.interp(u, ul, vl).astype(np.float32)
        # Where the jaw parts. With teeth showing (a smile) they are mostly the upper teeth, which stay
        # with the skull: part the jaw just above the lower lip so they are not cut in half.
        shows_teeth = self._shows_teeth(lm)
        split = upper + (0.78 if shows_teeth else 0.5) * (lower - upper)
        self._split_dist = np.abs(v - split).astype(np.float32)
        below = v > split

        taper = _edge_taper(u.shape, 0.12 * self._face_h)
        g_mouth = np.clip(1 - (u / inner_hw) ** 2, 0, 1) ** 0.85
        g_jaw = np.exp(-((u / (1.05 * jaw_hw)) ** 4))
        span = np.maximum(chin_v - split, 1.0)
        s = _smoothstep(0.0, 0.45, np.clip((v - split) / span, 0, 1))
        fall = np.where(v > chin_v, np.exp(-(((v - chin_v) / below_chin) ** 2)), 1.0)
        lower_drop = ((1 - s) * g_mouth + s * g_jaw) * fall
        above_r = np.clip((split - v) / np.maximum(split - nose_v, 1.0), 0, 1)
        upper_rise = 0.12 * g_mouth * (1 - _smoothstep(0.0, 1.0, above_r))
        j = JAW_DROP * 2 * mw
        open_v = np.where(below, j * lower_drop, -j * upper_rise) * taper
        self._open_x, self._open_y = frame.to_xy(np.zeros_like(open_v), open_v)
        self._open_depth = np.abs(open_v).astype(np.float32)  # how far a pixel's source crosses the split per unit

        # Pressing: each lip moves to the split line, covering the teeth; fades towards nose and chin.
        lips = _smoothstep(0.0, 0.6, np.clip(1 - (u / (1.15 * mw)) ** 2, 0, 1))
        press_up = (split - upper) * lips * (1 - _smoothstep(0.0, 1.0, above_r))
        lower_r = np.clip((v - split) / span, 0, 1)
        press_lo = (lower - split) * lips * (1 - _smoothstep(0.0, 0.8, lower_r))
        press_v = np.where(below, -press_lo, press_up) * taper
        self._press_x, self._press_y = frame.to_xy(np.zeros_like(press_v), press_v)
        self._press_depth = np.abs(press_v).astype(np.float32)
        # Where pressed lips meet: a soft dark line (it also hides the seam between the two pulls).
        inner = _smoothstep(0.0, 0.5, np.clip(1 - (u / (0.95 * mw)) ** 2, 0, 1))
        self._lip_line = (np.exp(-((v - split) / 2.0) ** 2) * inner * taper).astype(np.float32)

        # Spreading (+) or rounding (−): horizontal scaling around the mouth.
        bump = np.exp(-((u / (1.5 * mw)) ** 2 + ((v - split) / (0.75 * mw)) ** 2))
        wide_u = WIDE_GAIN * u * bump * taper
        self._wide_x, self._wide_y = frame.to_xy(wide_u, np.zeros_like(wide_u))

        # Oral cavity: its colour depends on how far down the current gap a pixel is (see _shade_mouth).
        self._gap_v = (v - split).astype(np.float32)
        self._gap_centre = np.clip(1 - (u / inner_hw) ** 2, 0, 1).astype(np.float32)
        self._jaw_px = j
        self._teeth_band = np.where(below, -1.0, split - v).astype(np.float32)  # distance above the split
        self._draw_teeth = not shows_teeth
        self._mouth_width = 2 * mw

    def _shows_teeth(self, lm: np.ndarray) -> bool:
        """Does the portrait already show teeth between the lips (then they move with the warp)?"""
        gap = float(np.linalg.norm(lm[14] - lm[13]))
        if gap < 4:
            return False
        y0, y1 = sorted((int(lm[13][1]), int(lm[14][1])))
        x = int(lm[13][0])
        patch = self._image[y0 : y1 + 1, max(0, x - 6) : x + 7].reshape(-1, 3).astype(np.float32)
        return bool(patch.mean() > 140 and (patch.max(axis=1) - patch.min(axis=1)).mean() < 60)

    def _build_eyes(self, lm: np.ndarray) -> None:
        self._eyes: list[tuple[_Rect, np.ndarray, np.ndarray, np.ndarray]] = []
        for (c0, c1), upper_ids, lower_ids in EYES:
            a, b = lm[c0], lm[c1]
            if a[0] > b[0]:
                a, b = b, a
            frame = _Frame((a + b) / 2, math.atan2(b[1] - a[1], b[0] - a[0]))
            ew = float(np.linalg.norm(b - a)) / 2
            uu, vu = _curve(frame, lm[upper_ids + [c0, c1]])
            ul, vl = _curve(frame, lm[lower_ids + [c0, c1]])
            height = float(np.max(np.interp(np.linspace(-ew, ew, 9), ul, vl) - np.interp(np.linspace(-ew, ew, 9), uu, vu)))
            height = max(height, 2.0)
            rect = self._clip(
                _Rect(
                    int(frame.c[1] - 3.2 * height),
                    int(frame.c[1] + 1.5 * height + 3),
                    int(frame.c[0] - 1.3 * ew),
                    int(frame.c[0] + 1.3 * ew + 1),
                )
            )
            gx, gy = rect.padded(PAD).grid()
            u, v = frame.uv(gx, gy)
            top = np.interp(u, uu, vu)
            bottom = np.interp(u, ul, vl)
            lens = np.clip(1 - (u / (1.1 * ew)) ** 2, 0, 1) ** 0.35
            # The lid skin above the lid margin (a strip of 0.6 × the opening) stretches down to the lower lid:
            # a linear, monotonic stretch, so the brow above it never moves.
            h_eye = np.maximum(bottom - top, 0.0)
            skin = 0.6 * h_eye
            stretch = np.clip(v - (top - skin), 0.0, None) * h_eye / np.maximum(h_eye + skin, 1e-3)
            below = 1 - _smoothstep(0.5, 2.0, v - bottom)
            drop = np.where(v > bottom, h_eye * below, stretch) * lens
            bx, by = frame.to_xy(np.zeros_like(drop), drop)
            # Lashes: where the closed lids meet, a soft dark line.
            lash = (np.exp(-(((v - bottom) / 1.4) ** 2)) * lens * (u**2 < ew**2)).astype(np.float32)
            self._eyes.append((rect, bx, by, lash))

    def _build_idle(self) -> None:
        n = self.idle_period_frames
        k = np.arange(n, dtype=np.float64)
        tau = 2 * math.pi * k / n
        scale = self._face_h / 260.0  # motion in proportion to the face size
        tx = scale * (1.6 * np.sin(tau + 0.4) + 0.6 * np.sin(3 * tau + 1.3))
        ty = scale * (0.9 * np.sin(2 * tau + 2.1) + 0.4 * np.sin(5 * tau + 0.2))
        roll = np.radians(0.9 * np.sin(2 * tau + 0.9) + 0.35 * np.sin(3 * tau + 2.4))
        blink = np.zeros(n)
        shape = np.array([0.35, 0.85, 1.0, 0.7, 0.3, 0.1])
        frames_per_s = self.fps
        for start_s in (1.4, 5.0, 5.45) if n >= 6.5 * frames_per_s else (n / frames_per_s / 2,):
            s = int(start_s * frames_per_s) % n
            for i, value in enumerate(shape):
                blink[(s + i) % n] = max(blink[(s + i) % n], value)
        self._idle = np.stack([tx, ty, roll, blink], axis=1).astype(np.float32)

    def _clip(self, r: _Rect) -> _Rect:
        """Keep a feature rect (with its padding) inside the head ROI."""
        roi = self._roi
        return _Rect(max(r.y0, roi.y0 + PAD), min(r.y1, roi.y1 - PAD), max(r.x0, roi.x0 + PAD), min(r.x1, roi.x1 - PAD))

    # -- per frame ------------------------------------------------------------------------------

    def idle_state(self, frame_index: int) -> tuple[float, float, float, float]:
        tx, ty, roll, blink = self._idle[frame_index % self.idle_period_frames]
        return float(tx), float(ty), float(roll), float(blink)

    def mouth_shift(self, frame_index: int) -> tuple[int, int]:
        """The idle head motion at the mouth in this frame, in whole pixels (at most PAD each way)."""
        tx, ty, roll, _ = self.idle_state(frame_index)
        c = self._mouth_center
        ox = int(round(tx - roll * (c[1] - self._pivot[1])))
        oy = int(round(ty + roll * (c[0] - self._pivot[0])))
        return max(-PAD, min(PAD, ox)), max(-PAD, min(PAD, oy))

    def render(self, frame_index: int, mouth: np.ndarray | Sequence[float], out: np.ndarray | None = None) -> np.ndarray:
        opening, wide, press = (float(x) for x in mouth[:3])
        tx, ty, roll, blink = self.idle_state(frame_index)
        mx = cv2.scaleAdd(self._hw, tx, self._gx)
        mx = cv2.scaleAdd(self._hy, -roll, mx)
        my = cv2.scaleAdd(self._hw, ty, self._gy)
        my = cv2.scaleAdd(self._hx, roll, my)
        # The head moves the features: shift their fields by the head's motion at the mouth (whole px).
        ox, oy = self.mouth_shift(frame_index)

        mrect = self._mouth_rect
        m_sl = mrect.within(self._roi)
        f_sl = (slice(PAD - oy, PAD - oy + mrect.y1 - mrect.y0), slice(PAD - ox, PAD - ox + mrect.x1 - mrect.x0))
        if opening or wide or press:
            sub_x, sub_y = mx[m_sl], my[m_sl]
            for coef, fx, fy in (
                (opening, self._open_x, self._open_y),
                (wide, self._wide_x, self._wide_y),
                (press, self._press_x, self._press_y),
            ):
                if coef:
                    sub_x -= coef * fx[f_sl]
                    sub_y -= coef * fy[f_sl]
        lashes = []
        if blink > 0:
            for rect, bx, by, lash in self._eyes:
                e_sl = rect.within(self._roi)
                ef = (slice(PAD - oy, PAD - oy + rect.y1 - rect.y0), slice(PAD - ox, PAD - ox + rect.x1 - rect.x0))
                mx[e_sl] -= blink * bx[ef]
                my[e_sl] -= blink * by[ef]
                lashes.append((e_sl, lash[ef]))

        roi = cv2.remap(self._image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if opening > 0.01:
            self._shade_mouth(roi[m_sl], opening, press, f_sl)
        if press > 0.05:
            closed = press * max(0.0, 1.0 - 3.0 * opening)
            if closed > 0:
                region = roi[m_sl].astype(np.float32)
                region *= (1 - 0.3 * closed * self._lip_line[f_sl])[..., None]
                roi[m_sl] = region.astype(np.uint8)
        for e_sl, lash in lashes:
            region = roi[e_sl].astype(np.float32)
            region *= (1 - 0.45 * blink * blink * lash)[..., None]
            roi[e_sl] = region.astype(np.uint8)

        if out is None:
            out = self._image.copy()
        else:
            out[...] = self._image
        r = self._roi
        out[r.y0 : r.y1, r.x0 : r.x1] = roi
        return out

    def _shade_mouth(self, region: np.ndarray, opening: float, press: float, f_sl: tuple[slice, slice]) -> None:
        depth = opening * self._open_depth[f_sl] - press * self._press_depth[f_sl] - self._split_dist[f_sl]
        # Anti-aliased edge, and nothing where the opening moves a pixel by under a pixel (off the lips).
        alpha = np.clip(depth + 0.5, 0.0, 1.0) * np.clip(opening * self._open_depth[f_sl], 0.0, 1.0)
        rows = np.flatnonzero(alpha.max(axis=1) > 0)
        if not len(rows):
            return
        r0, r1 = rows[0], rows[-1] + 1
        a = alpha[r0:r1, :, None]
        # Dark under the upper lip, shading to the tongue's tone low in the gap and towards its middle.
        gap = max(opening * self._jaw_px, 1.0)
        low = _smoothstep(0.15, 1.0, self._gap_v[f_sl][r0:r1] / gap) * self._gap_centre[f_sl][r0:r1]
        cavity = CAVITY + (TONGUE - CAVITY) * (0.75 * low)[..., None]
        if self._draw_teeth:
            # Upper teeth just under the upper lip, when the mouth is open enough to show them.
            band = self._teeth_band[f_sl][r0:r1]
            gap_top = opening * self._open_depth[f_sl][r0:r1]
            teeth_h = 0.07 * self._mouth_width * min(1.0, opening * 1.6)
            t = np.clip((teeth_h - (gap_top - band)) / 1.5, 0, 1) * (band >= 0) * 0.9
            cavity = cavity + (TEETH - cavity) * t[..., None]
        block = region[r0:r1].astype(np.float32)
        # A soft shadow just outside the gap makes the lips' inner edge read as depth.
        near_gap = self._open_depth[f_sl][r0:r1] * opening > 1.0
        shadow = (np.clip((depth[r0:r1] + 3.0) / 3.0, 0.0, 1.0) * near_gap)[..., None] * 0.18
        block *= 1 - shadow
        block += (cavity - block) * a
        region[r0:r1] = block.astype(np.uint8)

    def idle_frames(self) -> Iterator[np.ndarray]:
        rest = np.zeros(3, np.float32)
        for k in range(self.idle_period_frames):
            yield self.render(k, rest)
