"""The 2D avatar renderer: warps the real face of a portrait along its face-mesh landmarks.

Everything heavy is precomputed per avatar as backward displacement fields over regions of interest:
the jaw/lip opening, lip spreading/rounding, lip pressing, and an eyelid field per eye; plus a head
weight that fades to zero before the region's border, so warps never leave seams. A frame is one
``cv2.remap`` of the head region with map = grid − Σ coefficient·field, then anti-aliased shading of the
oral cavity where a pixel's source lies across the lip line (the gap that opens between the lips).
Idle life (blinks, small head motion) is a periodic function of the frame index, so the idle loop
is seamless and motion continues across pieces of speech. It is also the same in every session: the
live path (``render_yuv``) takes the idle frame from a shared cache, in the encoder's I420, and warps,
shades and converts only the mouth's region.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from avatarchat.engines.avatar.face import AvatarModel
from avatarchat.engines.avatar.frame_cache import FrameCache, owner_id

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
TEETH = np.array([232, 226, 212], np.float32)  # in a portrait lit like a passport photo (face ~175 luma)
TONGUE = np.array([182, 86, 92], np.float32)
# Tooth edges across the mouth, in half inner-lip widths from the middle: incisors, canines, premolars.
UPPER_TEETH = np.array([0.0, 0.25, 0.46, 0.64, 0.79, 0.92])
LOWER_TEETH = np.array([0.0, 0.16, 0.33, 0.5, 0.66, 0.8])


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


@dataclass(frozen=True)
class _Eye:
    rect: _Rect
    frame: _Frame
    v: np.ndarray  # across the eye (down), over the padded rect
    top: np.ndarray  # the upper lid margin's v at each pixel's u
    h: np.ndarray  # the eye's opening there
    lens: np.ndarray  # 1 over the eye, 0 beyond its corners and at the rect's edge
    skin: np.ndarray  # (H, W, 3) float32: the lid's skin, shaded, over the padded rect
    lash: np.ndarray  # (3,) float32: the colour of the lashes


def _edge_taper(shape: tuple[int, int], margin: float) -> np.ndarray:
    """1 inside, falling to exactly 0 within PAD + 1 px of the padded rect's edge: fields leave no seam."""
    h, w = shape
    ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32) - PAD - 1
    xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32) - PAD - 1
    return np.minimum(_smoothstep(0.0, margin, ys)[:, None], _smoothstep(0.0, margin, xs)[None, :]).astype(np.float32)


def _paste_i420(frame: np.ndarray, part: np.ndarray, r: _Rect, size: tuple[int, int]) -> np.ndarray:
    """Paste ``part`` (I420 of the even-aligned rect ``r``) into ``frame`` (I420 of an image of ``size`` h, w)."""
    big_h, big_w = size
    h, w = r.y1 - r.y0, r.x1 - r.x0
    frame[r.y0 : r.y1, r.x0 : r.x1] = part[:h]
    f, p = frame.reshape(-1), part.reshape(-1)
    big, small = big_h * big_w, h * w
    for k in range(2):  # U, then V: each a quarter-size plane after Y
        plane = f[big + k * big // 4 : big + (k + 1) * big // 4].reshape(big_h // 2, big_w // 2)
        plane[r.y0 // 2 : r.y1 // 2, r.x0 // 2 : r.x1 // 2] = p[small + k * small // 4 : small + (k + 1) * small // 4].reshape(h // 2, w // 2)
    return frame


def _curve(frame: _Frame, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, v = frame.uv(pts[:, 0], pts[:, 1])
    order = np.argsort(u)
    return u[order], v[order]


class AvatarRenderer:
    def __init__(self, model: AvatarModel, fps: int = 25, idle_period_frames: int = 200,
                 cache: FrameCache | None = None) -> None:
        self.model = model
        self.fps = fps
        self.idle_period_frames = idle_period_frames
        self._cache = cache
        self._owner = owner_id()
        img = np.ascontiguousarray(model.image)
        self._image = img
        h, w = img.shape[:2]
        lm = model.landmarks.astype(np.float32)
        self._face_h = float(np.linalg.norm(lm[CHIN] - lm[FOREHEAD]))
        self._build_head(lm, w, h)
        self._build_mouth(lm)
        self._build_eyes(lm)
        self._build_idle()
        # A cached idle frame is reused around the mouth only if no lid is drawn in the mouth's region, which is
        # widened to even rows and columns (I420 keeps a colour sample per 2x2 pixels; the rect lies PAD px
        # inside the head region, so the widened one does too).
        m = self._mouth_rect
        m = _Rect(m.y0 - m.y0 % 2, m.y1 + m.y1 % 2, m.x0 - m.x0 % 2, m.x1 + m.x1 % 2)
        alone = not any(e.rect.y0 < m.y1 and m.y0 < e.rect.y1 and e.rect.x0 < m.x1 and m.x0 < e.rect.x1
                        for e in self._eyes)
        self._mouth_even = m if alone else None

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

        # The inside of the mouth (see _shade_mouth), in the gap's own coordinates: across (u / inner half
        # width) and, per unit of opening, where the upper edge is (it rises a little) and how tall the gap is.
        self._gap_v = (v - split).astype(np.float32)
        self._gap_u = np.clip(u / inner_hw, -1, 1).astype(np.float32)
        self._rise_full = (j * 0.12 * g_mouth * taper).astype(np.float32)
        self._gap_full = (j * 1.12 * g_mouth * taper).astype(np.float32)
        self._draw_teeth = not shows_teeth
        self._mouth_width = 2 * mw
        self._palette(lm, shows_teeth)
        # What of the inside depends only on the place across the mouth, computed once.
        un = self._gap_u
        self._side = (1 - un * un).astype(np.float32)
        self._tongue_side = (np.sqrt(self._side) * 0.55).astype(np.float32), (1 - 0.35 * un * un).astype(np.float32)
        self._upper_teeth = self._tooth_row(UPPER_TEETH, 0.2, 0.11 * self._mouth_width * (1 - 0.45 * un * un))
        self._lower_teeth = self._tooth_row(LOWER_TEETH, 0.12, np.clip(1 - (un / 0.7) ** 2, 0, 1) ** 0.5)
        # Where an opening up to 1 can show the inside at all (with room for the gap's shadow): the rest of
        # the mouth's region is never shaded, so it is not computed per frame.
        ys, xs = np.nonzero(self._open_depth - self._split_dist > -0.7)
        self._gap_box = (int(ys.min()) - 1, int(ys.max()) + 2, int(xs.min()) - 6, int(xs.max()) + 7) if len(ys) else None
        # Fine grain, so the interior is never a flat fill (fixed per avatar: it does not flicker).
        grain = np.random.default_rng(int(abs(lm[13]).sum() * 100) % 2**32).normal(0, 1, u.shape).astype(np.float32)
        grain = cv2.GaussianBlur(grain, (0, 0), 0.8)
        self._grain = (grain / (grain.std() + 1e-6) * 0.035).astype(np.float32)

    def _tooth_row(self, edges: np.ndarray, gaps: float, height: np.ndarray) -> tuple[np.ndarray, ...]:
        """A row of teeth across the mouth: each pixel's height (px, or a share for the lower row), its
        rounded tips, and its shade: darker towards the corners and in the gaps between teeth."""
        un = self._gap_u
        dist = np.min(np.abs(np.abs(un)[..., None] - edges[1:]), axis=-1) * (0.5 * self._mouth_width)
        tips = 1 - 0.12 * np.exp(-((dist / 1.5) ** 2))
        shade = (1 - 0.4 * un * un) * (1 - gaps * np.exp(-((dist / 0.6) ** 2)))
        return height.astype(np.float32), tips.astype(np.float32), shade.astype(np.float32)

    def _palette(self, lm: np.ndarray, shows_teeth: bool) -> None:
        """Colours of the mouth's inside, matched to the portrait: from its lips, and its light on the skin."""
        h, w = self._image.shape[:2]
        outer = np.round(np.concatenate([lm[OUTER_UPPER], lm[OUTER_LOWER][::-1]])).astype(np.int32)
        inner = np.round(np.concatenate([lm[INNER_UPPER], lm[INNER_LOWER][::-1]])).astype(np.int32)
        lips = np.zeros((h, w), np.uint8)
        cv2.fillPoly(lips, [outer], 1)
        cv2.fillPoly(lips, [inner], 0)
        lip = np.median(self._image[lips > 0], axis=0).astype(np.float32) if lips.any() else TONGUE
        # The photo's exposure from the whites of the eyes, which are near white whatever the skin's tone (teeth
        # are about as bright); without them (small or hidden eyes), from its brightest things (a collar, a wall).
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        sclera = self._sclera(lm)
        if sclera is not None:
            teeth = np.minimum(sclera * 0.95, 240.0)
        else:
            px = self._image.reshape(-1, 3).astype(np.float32)
            y = px @ luma
            white = px[y >= np.percentile(y, 98)].mean(axis=0)
            teeth = np.minimum(white * 0.82 * np.array([1.0, 0.93, 0.8], np.float32), 240.0)  # ivory, in shade
        light = float(np.clip(teeth @ luma / 200.0, 0.4, 1.15))
        if shows_teeth:  # the portrait's own teeth
            gap = np.zeros((h, w), np.uint8)
            cv2.fillPoly(gap, [inner], 1)
            px = self._image[gap > 0].astype(np.float32)
            bright = px[px.sum(axis=1) >= np.percentile(px.sum(axis=1), 60)] if len(px) else px
            if len(bright):
                teeth = np.median(bright, axis=0)
        self._lip_rgb = lip
        self._throat_rgb = lip * np.array([0.5, 0.26, 0.28], np.float32)  # deep red, in the photo's light
        self._tongue_rgb = 0.25 * lip + 0.75 * TONGUE * light  # pink whatever the lips: mostly the light
        self._teeth_rgb = teeth.astype(np.float32)

    def _sclera(self, lm: np.ndarray) -> np.ndarray | None:
        """The colour of the whites of the eyes (the brighter part of each eye outside its iris), if enough shows."""
        if len(lm) < 478:
            return None
        h, w = self._image.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        for ((c0, c1), upper, lower), iris in zip(EYES, (468, 473)):
            cv2.fillPoly(mask, [np.round(lm[[c0, *upper, c1, *lower[::-1]]]).astype(np.int32)], 1)
            radius = float(np.mean(np.linalg.norm(lm[iris + 1 : iris + 5] - lm[iris], axis=1)))
            cv2.circle(mask, tuple(int(v) for v in np.round(lm[iris])), int(np.ceil(1.15 * radius)), 0, -1)
        px = self._image[mask > 0].astype(np.float32)
        if len(px) < 12:
            return None
        y = px @ np.array([0.299, 0.587, 0.114], np.float32)
        white = np.median(px[y >= np.percentile(y, 60)], axis=0)
        # Not white at all (lids or lashes, squinting behind tinted glasses): no evidence.
        return white if float(white.max() - white.min()) < 0.35 * max(float(white.max()), 1.0) else None

    def _patch_at(self, point: np.ndarray, radius: float) -> np.ndarray:
        x, y, r = int(point[0]), int(point[1]), max(2, int(radius))
        return self._image[max(0, y - r) : y + r, max(0, x - r) : x + r].reshape(-1, 3).astype(np.float32)

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
        self._eyes: list[_Eye] = []
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
            top = np.interp(u, uu, vu).astype(np.float32)
            bottom = np.interp(u, ul, vl).astype(np.float32)
            lens = (np.clip(1 - (u / (1.2 * ew)) ** 2, 0, 1) ** 0.3 * _edge_taper(u.shape, 2.0)).astype(np.float32)
            h = np.maximum(bottom - top, 0.0)
            # The lid skin's colour: the skin between lashes and brow, smoothed (normalised convolution) and
            # carried over the eye. Stretching the real strip above the lashes would smear lashes into streaks.
            p = rect.padded(PAD)
            patch = self._image[max(0, p.y0) : p.y1, max(0, p.x0) : p.x1].astype(np.float32)
            # Skin above the lashes and below the lower lid: the lid takes a blend of the two, smooth across it.
            band = (((v > top - 1.5 * height) & (v < top - 0.5 * height))
                    | ((v > bottom + 0.5 * height) & (v < bottom + 1.3 * height))) & (np.abs(u) < 1.1 * ew)
            band = band[-patch.shape[0] :, -patch.shape[1] :]
            lum = patch.sum(axis=2)
            if band.any():  # skin, not the lashes or the crease that reach into the band
                band &= lum >= np.percentile(lum[band], 35)
            band = band.astype(np.float32)
            sigma = max(1.0, 0.5 * height)
            weight = cv2.GaussianBlur(band, (0, 0), sigma) + 1e-4
            skin = cv2.GaussianBlur(patch * band[..., None], (0, 0), sigma) / weight[..., None]
            if skin.shape[:2] != u.shape:  # the padded rect reached past the image: edge-replicate
                skin = cv2.copyMakeBorder(skin, u.shape[0] - skin.shape[0], 0, u.shape[1] - skin.shape[1], 0,
                                          cv2.BORDER_REPLICATE)
            # A lid is round: a little darker towards its edge and the eye's corners.
            shade = 1 - 0.07 * np.clip((v - top) / height, 0, 1) - 0.06 * (u / ew) ** 2
            skin = skin * np.clip(shade, 0.75, 1.0)[..., None]
            near = (np.abs(v - top) < max(1.0, 0.2 * height)) & (np.abs(u) < 0.8 * ew)
            near = near[-patch.shape[0] :, -patch.shape[1] :]
            dark = patch[near] if near.any() else patch.reshape(-1, 3)
            lash = dark[np.argsort(dark.sum(axis=1))[: max(1, len(dark) // 5)]].mean(axis=0)
            self._eyes.append(_Eye(rect, frame, v.astype(np.float32), top, h, lens, skin.astype(np.float32),
                                   lash.astype(np.float32)))

    def _lid(self, eye: _Eye, blink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The upper lid lowered by ``blink`` (0 open, 1 closed): how much of each pixel is lid skin, lash line,
        and shadow. The lid is drawn, not warped: the eye under it stays put, and stretching the real strip above
        the lashes would smear them into streaks. Every edge is a smooth function of the distance to the lid's
        margin, so it is anti-aliased at any position."""
        v, top, h = eye.v, eye.top, np.maximum(eye.h, 2.0)
        margin = top + blink * 1.02 * h  # the lid's edge now; closed, it meets the lower lid
        strength = min(1.0, 4 * blink)
        lid = _smoothstep(-0.6, -0.15, (v - top) / h) * (1 - _smoothstep(-0.6, 0.6, v - margin))
        cover = (lid * eye.lens * strength).astype(np.float32)
        width = np.maximum(0.12 * h, 0.7)
        lash = (np.exp(-(((v - margin) / width) ** 2)) * eye.lens * strength).astype(np.float32)
        below = v - margin
        shadow = np.exp(-((below / np.maximum(0.15 * h, 0.8)) ** 2)) * (below > 0) * eye.lens * strength
        return cover, lash, shadow.astype(np.float32)

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
        return self._render(frame_index, opening, wide, press, out)

    def render_yuv(self, frame_index: int, mouth: np.ndarray | Sequence[float]) -> np.ndarray:
        """The frame in I420, as the encoder takes it (``cv2.COLOR_RGB2YUV_I420`` of ``render``). The idle frame
        (head motion, blinks) comes from the cache; only the mouth's region is warped and converted anew."""
        opening, wide, press = (float(x) for x in mouth[:3])
        r = self._mouth_even
        if self._cache is None or r is None:
            return cv2.cvtColor(self._render(frame_index, opening, wide, press, None), cv2.COLOR_RGB2YUV_I420)
        key = (self._owner, frame_index % self.idle_period_frames)
        idle = self._cache.get(key)
        if idle is None:
            idle = self._cache.put(key, cv2.cvtColor(self._render(frame_index, 0.0, 0.0, 0.0, None),
                                                     cv2.COLOR_RGB2YUV_I420))
        out = idle.copy()
        if opening or wide or press:
            part = cv2.cvtColor(self._mouth(frame_index, opening, wide, press, r), cv2.COLOR_RGB2YUV_I420)
            _paste_i420(out, part, r, self._image.shape[:2])
        return out

    def warm(self) -> None:
        """Put the idle loop's frames in the cache (what a live stream's first seconds would do)."""
        if self._cache is not None:
            rest = np.zeros(3, np.float32)
            for k in range(self.idle_period_frames):
                self.render_yuv(k, rest)

    def _render(self, frame_index: int, opening: float, wide: float, press: float, out: np.ndarray | None) -> np.ndarray:
        """The whole head region warped: idle motion, lids and mouth."""
        blink = self.idle_state(frame_index)[3]
        roi = self._mouth(frame_index, opening, wide, press, self._roi)
        if blink > 0:
            ox, oy = self.mouth_shift(frame_index)
            for eye in self._eyes:
                rect = eye.rect
                e_sl = rect.within(self._roi)
                ef = (slice(PAD - oy, PAD - oy + rect.y1 - rect.y0), slice(PAD - ox, PAD - ox + rect.x1 - rect.x0))
                cover, lash, shadow = (a[ef] for a in self._lid(eye, blink))
                region = roi[e_sl].astype(np.float32)
                region *= (1 - 0.3 * shadow)[..., None]
                region += (eye.skin[ef] - region) * cover[..., None]
                region += (eye.lash - region) * (0.8 * lash)[..., None]
                roi[e_sl] = region.astype(np.uint8)
        if out is None:
            out = self._image.copy()
        else:
            out[...] = self._image
        r = self._roi
        out[r.y0 : r.y1, r.x0 : r.x1] = roi
        return out

    def _mouth(self, frame_index: int, opening: float, wide: float, press: float, area: _Rect) -> np.ndarray:
        """The part ``area`` of the head region (the whole of it, or around the mouth) warped by the head's idle
        motion and the mouth's coefficients, with the mouth's inside shaded."""
        tx, ty, roll, _ = self.idle_state(frame_index)
        sl = area.within(self._roi)
        mx = cv2.scaleAdd(self._hw[sl], tx, self._gx[sl])
        mx = cv2.scaleAdd(self._hy[sl], -roll, mx)
        my = cv2.scaleAdd(self._hw[sl], ty, self._gy[sl])
        my = cv2.scaleAdd(self._hx[sl], roll, my)
        # The head moves the features: shift their fields by the head's motion at the mouth (whole px).
        ox, oy = self.mouth_shift(frame_index)
        mrect = self._mouth_rect
        m_sl = mrect.within(area)
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
        roi = cv2.remap(self._image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if opening > 0.01:
            self._shade_mouth(roi[m_sl], opening, press, f_sl)
        if press > 0.05:
            closed = press * max(0.0, 1.0 - 3.0 * opening)
            if closed > 0:
                region = roi[m_sl].astype(np.float32)
                region *= (1 - 0.3 * closed * self._lip_line[f_sl])[..., None]
                roi[m_sl] = region.astype(np.uint8)
        return roi

    def _shade_mouth(self, region: np.ndarray, opening: float, press: float, f_sl: tuple[slice, slice]) -> None:
        if self._gap_box is not None and opening <= 1.0:
            y0, y1, x0, x1 = self._gap_box
            ys, xs = f_sl
            y0, y1, x0, x1 = max(y0, ys.start), min(y1, ys.stop), max(x0, xs.start), min(x1, xs.stop)
            if y0 >= y1 or x0 >= x1:
                return
            region = region[y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start]
            f_sl = (slice(y0, y1), slice(x0, x1))
        depth = opening * self._open_depth[f_sl] - press * self._press_depth[f_sl] - self._split_dist[f_sl]
        # Anti-aliased edge, and nothing where the opening moves a pixel by under a pixel (off the lips).
        alpha = np.clip((depth + 0.7) / 1.4, 0.0, 1.0) * np.clip(opening * self._open_depth[f_sl], 0.0, 1.0)
        rows = np.flatnonzero(alpha.max(axis=1) > 0)
        if not len(rows):
            return
        cols = np.flatnonzero(alpha.max(axis=0) > 0)
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, max(0, cols[0] - 3), cols[-1] + 4  # the gap, and its shadow's room
        ys, xs = f_sl[0].start + r0, f_sl[1].start + c0
        rs = (slice(ys, ys + r1 - r0), slice(xs, xs + min(c1, alpha.shape[1]) - c0))
        a = alpha[r0:r1, c0:c1]
        side = self._side[rs]
        tall = np.maximum(opening * self._gap_full[rs], 1.0)  # the gap's height in this column, px
        top = self._gap_v[rs] + opening * self._rise_full[rs]  # px below the upper lip's inner edge
        bottom = tall - top  # px above the lower lip's inner edge
        # The back of the mouth: darkest deep in the middle of the gap.
        deep = np.sin(np.float32(np.pi) * np.clip(top / tall, 0, 1)) * side
        # The tongue: a dome rising from behind the lower teeth, lighter at its tip than at its back.
        dome = self._tongue_side[0][rs] * tall
        tongue = np.clip((dome - bottom) / 1.2, 0, 1) * np.clip(tall / 4 - 0.5, 0, 1)
        tone = (0.6 + 0.4 * np.clip(1 - bottom / np.maximum(dome, 1.0), 0, 1)) * self._tongue_side[1][rs]
        # Lower teeth, in the upper lip's shadow, once the jaw has dropped far enough to show them; upper teeth
        # hanging from under the upper lip (the skull's; they do not move) unless the photo shows its own.
        low = min(0.04 * self._mouth_width, 0.2 * float(tall.max()))
        lower = self._teeth(bottom, low, self._lower_teeth, rs, 0.9)
        upper = self._teeth(top, 1.0, self._upper_teeth, rs, 1.0) if self._draw_teeth else None
        # The lips' moist inner edge.
        rim = 0.35 * np.clip(np.exp(-((top / 1.3) ** 2)) + np.exp(-((bottom / 1.3) ** 2)), 0, 1)
        # Layers from the front: each shows by its cover times what the layers before it leave, so the colour is
        # one weighted sum of the layers' colours (one pass over RGB instead of one per layer).
        left = a * (1 + self._grain[rs])  # the gap's share of each pixel, with the fine grain
        colours, weights = [], []
        for rgb, cover, shade in ((self._lip_rgb * 0.75, rim, None), (self._teeth_rgb, *(upper or (None, None))),
                                  (self._teeth_rgb, *(lower or (None, None))), (self._tongue_rgb, tongue, tone)):
            if cover is None:
                continue
            colours.append(rgb)
            weights.append(left * cover if shade is None else left * cover * shade)
            left = left * (1 - cover)
        colours.append(self._throat_rgb)
        weights.append(left * (1.1 - 0.4 * deep))
        h, w = a.shape
        colour = (np.stack(weights, -1).reshape(h * w, -1) @ np.stack(colours).astype(np.float32)).reshape(h, w, 3)
        # A soft shadow just outside the gap makes the lips' inner edge read as depth.
        near_gap = self._open_depth[f_sl][r0:r1, c0:c1] * opening > 1.0
        shadow = np.clip((depth[r0:r1, c0:c1] + 3.0) / 3.0, 0.0, 1.0) * near_gap * 0.18
        block = region[r0:r1, c0:c1].astype(np.float32)
        block *= ((1 - shadow) * (1 - a))[..., None]
        block += colour
        region[r0:r1, c0:c1] = np.clip(block, 0, 255).astype(np.uint8)

    def _teeth(self, along: np.ndarray, scale: float, row: tuple[np.ndarray, ...], rs: tuple[slice, slice],
               light: float) -> tuple[np.ndarray, np.ndarray] | None:
        """A row of teeth (``_tooth_row``, heights times ``scale``) ``along`` px from its lip edge, a little darker
        right under the lip: how much it covers each pixel and its shade there (None where it shows nowhere)."""
        height = row[0][rs] * scale
        cover = np.clip(height * row[1][rs] - along, 0, 1) * np.clip(height - 1.0, 0, 1)
        if not cover.any():
            return None
        return cover, light * row[2][rs] * (0.8 + 0.2 * np.clip(along / 2.0, 0, 1))

    def idle_frames(self) -> Iterator[np.ndarray]:
        rest = np.zeros(3, np.float32)
        for k in range(self.idle_period_frames):
            yield self.render(k, rest)
