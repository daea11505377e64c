"""Video avatars: a short clip of a person becomes the idle loop, and its own mouth images drive the speech.

Made once, at upload (``make_clip``): the clip is decoded (PyAV), each frame's face mesh found (MediaPipe,
one face per frame or the upload is refused), and the whole clip framed by one fixed crop, so the head's
own motion stays. Kept: the quietest ``loop_s`` seconds as whole frames (JPEG: the idle loop, played
forward and back so it never jumps), and for every frame its lower face (JPEG) and landmarks.

Per output frame (``ClipRenderer.render``): the loop's frame for that index (real blinks and head motion),
then, unless its own mouth already fits, the clip frame whose mouth shape (opening, width) best fits the
wanted mouth row, with a similar head turn and, among near equals, the nearest in time (so consecutive
frames pick neighbouring images and the motion stays smooth). Its lower face is aligned to the loop frame's
skull by a similarity transform of rigid landmarks, colour-matched on its border, and blended through a
feathered mask over both jaws (the source's chin may be lower). No neural network: ~2–3 ms a frame.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatarchat.engines.avatar.quality import EYE_LIDS

# Face-mesh indices: the skull (eyes, nose, forehead) for alignment; the lower face and jaw for the mask.
RIGID = [33, 133, 263, 362, 168, 6, 197, 195, 5, 4, 1, 98, 327, 10, 109, 338, 151]
LOWER = [93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 98, 327, 2, 205, 425]
UPPER_LIP, LOWER_LIP, MOUTH_LEFT, MOUTH_RIGHT = 13, 14, 61, 291
EYE_OUTER, CHIN, FOREHEAD, NOSE_TIP = (33, 263), 152, 10, 1
CLIP_FILE = "clip.npz"


class ClipError(ValueError):
    """A clip that cannot be a video avatar; ``status`` is the HTTP status that fits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode a frame as JPEG")
    return data.tobytes()


def _unjpeg(data: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _pack(items: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(items) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in items])
    return np.frombuffer(b"".join(items), np.uint8).copy(), offsets


@dataclass(frozen=True)
class AvatarClip:
    """What a video avatar keeps of its clip (see the module's docstring)."""

    fps: int
    loop: list[np.ndarray]  # JPEG bytes (as uint8 arrays) of the idle loop's frames
    loop_start: int  # the clip frame index of loop[0]
    mouths: list[np.ndarray]  # JPEG of each clip frame's lower face, cut at mouth_box
    mouth_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the framed clip
    landmarks: np.ndarray  # (N, 478, 2) float32, every clip frame, in the framed clip's pixels

    @property
    def frames(self) -> int:
        return len(self.mouths)

    def save(self, directory: Path) -> None:
        loop, loop_offsets = _pack([b.tobytes() for b in self.loop])
        mouths, mouth_offsets = _pack([b.tobytes() for b in self.mouths])
        with open(directory / CLIP_FILE, "wb") as f:
            np.savez(f, fps=self.fps, loop=loop, loop_offsets=loop_offsets, loop_start=self.loop_start, mouths=mouths,
                     mouth_offsets=mouth_offsets, mouth_box=np.array(self.mouth_box), landmarks=self.landmarks)

    @classmethod
    def load(cls, directory: Path) -> AvatarClip | None:
        path = directory / CLIP_FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            def unpack(data: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
                return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

            return cls(int(z["fps"]), unpack(z["loop"], z["loop_offsets"]), int(z["loop_start"]),
                       unpack(z["mouths"], z["mouth_offsets"]), tuple(int(v) for v in z["mouth_box"]),  # type: ignore[arg-type]
                       z["landmarks"].astype(np.float32))


# -- making one, at upload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipLimits:
    min_s: float = 10.0
    max_s: float = 60.0
    max_frame_pixels: int = 3840 * 2160
    loop_s: float = 8.0
    max_faceless_share: float = 0.05


def _frames(data: bytes, fps: int, limits: ClipLimits) -> Iterator[np.ndarray]:
    """The clip's frames (RGB) at ``fps``: each output instant shows the last source frame at or before it."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # noqa: BLE001 - PyAV raises many kinds for files it cannot read
        raise ClipError(415, f"not a readable video: {e}") from e
    with container:
        if not container.streams.video:
            raise ClipError(415, "the file has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > limits.max_frame_pixels:
            raise ClipError(413, f"the video is {w}×{h}; the limit is {limits.max_frame_pixels} pixels a frame")
        stream.thread_type = "AUTO"
        step, t_next, held, start = 1.0 / fps, 0.0, None, None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (start or 0.0) + step
                start = t if start is None else start
                t -= start
                while held is not None and t_next < t - 1e-6:  # output instants before this frame: the previous one
                    yield held
                    t_next += step
                if t > limits.max_s + 0.5:
                    raise ClipError(422, f"the video is longer than {limits.max_s:g} s")
                held = frame.to_ndarray(format="rgb24")
                if turn := round((frame.rotation or 0) / 90) % 4:  # a phone's portrait clip: stored on its side
                    held = np.ascontiguousarray(np.rot90(held, turn))
            if held is not None:
                yield held
        except ClipError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt stream
            raise ClipError(400, f"the video could not be decoded: {e}") from e


def _detect(frames: Iterator[np.ndarray], fps: int) -> tuple[list[np.ndarray | None], tuple[int, int]]:
    """Face-mesh landmarks of every frame (None: no face), refusing any frame with two faces."""
    import mediapipe as mp

    found: list[np.ndarray | None] = []
    shape = (0, 0)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=2, refine_landmarks=True,
                                         min_detection_confidence=0.5) as mesh:
        for i, frame in enumerate(frames):
            h, w = frame.shape[:2]
            shape = (w, h)
            scale = min(1.0, 640 / max(w, h))  # the mesh works at 192–256 px: a smaller copy finds the same face
            small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else frame
            result = mesh.process(np.ascontiguousarray(small))
            faces = result.multi_face_landmarks or []
            if len(faces) > 1:
                raise ClipError(422, f"the frame at {i / fps:.1f} s shows {len(faces)} faces; a video avatar needs one person")
            found.append(np.array([(p.x * w, p.y * h) for p in faces[0].landmark], np.float32) if faces else None)
    return found, shape


def make_clip(data: bytes, fps: int = 25, size: int = 512, limits: ClipLimits | None = None) -> tuple[np.ndarray, np.ndarray, AvatarClip]:
    """A video avatar from a clip's bytes: (portrait, its landmarks, the clip). Blocking CPU work (about a
    third of the clip's length): run it off the loop. Raises ClipError with an HTTP status."""
    limits = limits or ClipLimits()
    found, _ = _detect(_frames(data, fps, limits), fps)
    n = len(found)
    if n / fps < limits.min_s:
        raise ClipError(422, f"the video is {n / fps:.1f} s; a video avatar needs {limits.min_s:g}–{limits.max_s:g} s")
    missing = [i for i, m in enumerate(found) if m is None]
    if len(missing) > limits.max_faceless_share * n:
        raise ClipError(422, f"no face in {len(missing)} of {n} frames (first at {missing[0] / fps:.1f} s); "
                             "the person must be in view all along")
    have = [i for i, m in enumerate(found) if m is not None]
    lm = np.stack([found[min(have, key=lambda j: abs(j - i))] if m is None else m for i, m in enumerate(found)])  # type: ignore[misc]
    # One crop for the whole clip, framed as a portrait is (face about half the height), from the median face.
    face_h = float(np.median(np.linalg.norm(lm[:, CHIN] - lm[:, FOREHEAD], axis=1)))
    if face_h < 64:
        raise ClipError(422, f"the face is {face_h:.0f} px tall; a video avatar needs at least 64 px")
    eyes = np.median((lm[:, EYE_OUTER[0]] + lm[:, EYE_OUTER[1]]) / 2, axis=0)
    side = face_h / 0.5
    x0, y0 = eyes[0] - side / 2, eyes[1] - 0.42 * side
    scale = size / side
    m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
    lm = (lm - [x0, y0]) * scale
    face = np.linalg.norm(lm[:, CHIN] - lm[:, FOREHEAD], axis=1)
    opening = np.linalg.norm(lm[:, LOWER_LIP] - lm[:, UPPER_LIP], axis=1) / face
    if np.percentile(opening, 95) - np.percentile(opening, 10) < 0.02:
        raise ClipError(422, "the mouth hardly moves in this video; record the person talking, so that its mouth "
                             "images can follow any speech")
    # The idle loop: the quietest stretch (least mouth motion), played forward and back.
    span = max(2, min(n, round(limits.loop_s * fps)))
    motion = np.convolve(opening, np.ones(span), "valid")
    loop_start = int(np.argmin(motion))
    # The lower face's box over the whole clip, with room for the feathered edge.
    pts = lm[:, LOWER].reshape(-1, 2)
    pad = 0.12 * float(np.median(face))
    box = (max(0, int(pts[:, 0].min() - pad)), max(0, int(pts[:, 1].min() - pad)),
           min(size, int(pts[:, 0].max() + pad) + 1), min(size, int(pts[:, 1].max() + pad) + 1))
    loop: list[np.ndarray] = []
    mouths: list[np.ndarray] = []
    for i, frame in enumerate(_frames(data, fps, limits)):
        if i >= n:
            break
        framed = cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
                                borderMode=cv2.BORDER_REPLICATE)
        if loop_start <= i < loop_start + span:
            loop.append(np.frombuffer(_jpeg(framed), np.uint8))
        mouths.append(np.frombuffer(_jpeg(framed[box[1] : box[3], box[0] : box[2]]), np.uint8))
    clip = AvatarClip(fps, loop, loop_start, mouths, box, lm.astype(np.float32))
    # The portrait (list, previews, posters): the loop frame with the most closed mouth and the most open eyes.
    eyes_open = np.mean([np.linalg.norm(lm[:, a] - lm[:, b], axis=1) / np.linalg.norm(lm[:, c] - lm[:, d], axis=1)
                         for a, b, c, d in EYE_LIDS], axis=0)
    k = loop_start + int(np.argmin((opening - 4 * eyes_open)[loop_start : loop_start + span]))
    return _unjpeg(loop[k - loop_start]), lm[k], clip


# -- rendering ------------------------------------------------------------------------------------------


class ClipRenderer:
    """A video avatar's frames (see the module's docstring). Thread-safe; decoded frames are cached."""

    def __init__(self, clip: AvatarClip, fps: int = 25, cache_frames: int = 24) -> None:
        if fps != clip.fps:
            raise ValueError(f"the clip was made at {clip.fps} fps, the stream runs at {fps}")
        self.clip = clip
        self.fps = fps
        loop = len(clip.loop)
        self.idle_period_frames = max(1, 2 * loop - 2)
        lm = clip.landmarks
        face = np.linalg.norm(lm[:, CHIN] - lm[:, FOREHEAD], axis=1)
        eye = np.linalg.norm(lm[:, EYE_OUTER[1]] - lm[:, EYE_OUTER[0]], axis=1)
        self._face = face
        self._open = np.linalg.norm(lm[:, LOWER_LIP] - lm[:, UPPER_LIP], axis=1) / face
        self._width = np.linalg.norm(lm[:, MOUTH_RIGHT] - lm[:, MOUTH_LEFT], axis=1) / eye
        self._yaw = (lm[:, NOSE_TIP, 0] - (lm[:, EYE_OUTER[0], 0] + lm[:, EYE_OUTER[1], 0]) / 2) / eye
        self._rest = float(np.percentile(self._open, 10))
        self._wide_open = max(float(np.percentile(self._open, 97)), self._rest + 1e-3)
        self._w_mid = float(np.median(self._width))
        self._w_lo, self._w_hi = float(np.percentile(self._width, 5)), float(np.percentile(self._width, 95))
        self._s_open = (self._wide_open - self._rest) / 6
        self._s_width = max((self._w_hi - self._w_lo) / 4, 1e-3)
        self._index = np.arange(clip.frames, dtype=np.float32)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_max = cache_frames
        self._lock = threading.Lock()

    @property
    def size(self) -> tuple[int, int]:
        h, w = self._decoded("loop", 0).shape[:2]
        return w, h

    def _decoded(self, kind: str, i: int) -> np.ndarray:
        key = (kind, i)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        image = _unjpeg((self.clip.loop if kind == "loop" else self.clip.mouths)[i])
        image.setflags(write=False)
        with self._lock:
            self._cache[key] = image
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return image

    def base_index(self, frame_index: int) -> int:
        """The clip frame the idle loop shows at ``frame_index`` (forward, then back)."""
        p = frame_index % self.idle_period_frames
        loop = len(self.clip.loop)
        return self.clip.loop_start + (p if p < loop else self.idle_period_frames - p)

    def pick(self, base: int, mouth: np.ndarray | Sequence[float]) -> int:
        """The clip frame whose mouth to show over ``base`` for the mouth row (opening, wide, press)."""
        opening, wide, press = (float(x) for x in mouth[:3])
        want_open = self._rest + max(0.0, min(1.0, opening)) * (1 - 0.8 * max(0.0, min(1.0, press))) * (self._wide_open - self._rest)
        want_w = self._w_mid + (wide * (self._w_hi - self._w_mid) if wide > 0 else wide * (self._w_mid - self._w_lo))
        cost = (((self._open - want_open) / self._s_open) ** 2 + 0.5 * ((self._width - want_w) / self._s_width) ** 2
                + ((self._yaw - self._yaw[base]) / 0.03) ** 2 + 4 * ((self._index - base) / len(self._index)) ** 2)
        best = int(np.argmin(cost))
        return base if cost[base] <= cost[best] + 1.0 else best  # its own mouth will do: untouched

    def render(self, frame_index: int, mouth: np.ndarray | Sequence[float], out: np.ndarray | None = None) -> np.ndarray:
        b = self.base_index(frame_index)
        base = self._decoded("loop", b - self.clip.loop_start)
        if out is None:
            out = base.copy()
        else:
            out[...] = base
        s = self.pick(b, mouth)
        if s != b:
            self._paste(out, b, s)
        return out

    def _paste(self, out: np.ndarray, b: int, s: int) -> None:
        lm = self.clip.landmarks
        m, _ = cv2.estimateAffinePartial2D(lm[s, RIGID], lm[b, RIGID], method=cv2.LMEDS)
        if m is None:
            return
        h, w = out.shape[:2]
        moved = lm[s, LOWER] @ m[:, :2].T + m[:, 2]
        pts = np.concatenate([lm[b, LOWER], moved])
        feather = max(2.0, 0.035 * float(self._face[b]))
        x0, y0 = (np.floor(pts.min(axis=0) - 3 * feather)).astype(int).clip(0)
        x1, y1 = np.ceil(pts.max(axis=0) + 3 * feather).astype(int)
        x1, y1 = min(int(x1), w), min(int(y1), h)
        if x1 - x0 < 4 or y1 - y0 < 4:
            return
        bx0, by0, _, _ = self.clip.mouth_box
        crop = self._decoded("mouth", s)
        a = m.astype(np.float32).copy()
        a[:, 2] += a[:, :2] @ np.array([bx0, by0], np.float32) - np.array([x0, y0], np.float32)
        size = (int(x1 - x0), int(y1 - y0))
        warped = cv2.warpAffine(crop, a, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        inside = cv2.warpAffine(np.ones(crop.shape[:2], np.float32), a, size, flags=cv2.INTER_LINEAR, borderValue=0)
        mask = np.zeros((size[1], size[0]), np.float32)
        cv2.fillConvexPoly(mask, cv2.convexHull((pts - [x0, y0]).astype(np.int32)), 1.0)
        mask = cv2.GaussianBlur(mask, (0, 0), feather) * cv2.erode(inside, np.ones((5, 5), np.uint8))
        region = out[y0:y1, x0:x1]
        # Colour match on the mask's outer half: the same person minutes apart, under light that may drift.
        ring = (mask > 0.05) & (mask < 0.5)
        if ring.any():
            warped += (region[ring].astype(np.float32) - warped[ring]).mean(axis=0)
        np.clip(warped, 0, 255, out=warped)
        region[...] = cv2.blendLinear(warped.astype(np.uint8), np.ascontiguousarray(region), mask, 1 - mask)

    def idle_frames(self) -> Iterator[np.ndarray]:
        rest = np.zeros(3, np.float32)
        for k in range(self.idle_period_frames):
            yield self.render(k, rest)
