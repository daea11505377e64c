"""Test faces: the public-domain portraits (docs/models.md), a darker-skinned variant, and video clips of a
talking person for video avatars. No public-domain talking-head video can be installed here, so a
portrait is made to talk by the landmark-warp renderer (real speech drives its mouth; its blinks
and head motion are the renderer's), then encoded as H.264 in MP4 like a phone's clip, off-centre in a
wider frame so that the upload has to find and frame the face."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import av
import cv2
import numpy as np

from avatarchat.engines.avatar.face import create_avatar, detect_landmarks
from avatarchat.engines.avatar.quality import EYE_RINGS
from avatarchat.engines.avatar.renderer import INNER_LOWER, INNER_UPPER, AvatarRenderer
from avatarchat.pipeline.media import Timeline
from tests.support.speech import _piper

PORTRAITS = Path(__file__).resolve().parents[1] / "data" / "portraits"
TALK = ("Hello, my name is Grace. I wrote one of the first compilers, and I like to explain how computers work. "
        "Ask me anything you want to know about programming, ships, or the navy. ")


def portrait(name: str = "grace_hopper.jpg") -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(PORTRAITS / name)), cv2.COLOR_BGR2RGB)


# The face's outline (MediaPipe face mesh), and the lips' inner edge as a closed outline.
OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
        150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
INNER_LIPS = INNER_UPPER + INNER_LOWER[-2:0:-1]


def darker_skin(image: np.ndarray, lightness: float = 0.42) -> np.ndarray:
    """The same face with much darker skin (and neck and ears' tone near the face), eyes and teeth as they
    were: a stand-in for a dark-skinned sitter, since no such public-domain photo is installable. In Lab:
    lightness scaled, a little more red and yellow, blended through the feathered face outline."""
    lm = detect_landmarks(image)
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.float32)
    cv2.fillPoly(mask, [np.round(lm[OVAL]).astype(np.int32)], 1.0)
    mask = cv2.dilate(mask, np.ones((25, 25), np.uint8))
    for part in (*EYE_RINGS, INNER_LIPS):
        cv2.fillPoly(mask, [np.round(lm[part]).astype(np.int32)], 0.0)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)[..., None]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    dark = lab * [lightness, 1.0, 1.0] + [0, 6, 10]
    out = lab * (1 - mask) + dark * mask
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


@functools.cache
def _talk(n: int) -> np.ndarray:
    piece = Timeline(25, 22050).prepare(_piper().synthesize(TALK * 3))
    rows = np.zeros((n, 3), np.float32)
    rows[: min(n, piece.frames)] = piece.mouth[:n]
    return rows


def talking_clip(seconds: float, *, faces: int = 1, talk: bool = True, fps: int = 25, size: tuple[int, int] = (640, 480),
                 image: np.ndarray | None = None, rotated: bool = False) -> bytes:
    """MP4 bytes: ``faces`` copies of a talking portrait side by side (quiet for its first 2 s), or with ``talk``
    False a face whose mouth never moves; ``faces=0``: noise, no face at all. ``rotated``: stored on its side
    with a display rotation, as a phone stores a portrait clip."""
    renderer = AvatarRenderer(create_avatar(portrait() if image is None else image, "clip", size=size[1]))
    n = round(seconds * fps)
    rows = _talk(n).copy() if talk else np.zeros((n, 3), np.float32)
    rows[: 2 * fps] = 0
    w, h = size
    out = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = (h, w) if rotated else (w, h)
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        if rotated:
            stream.set_display_rotation(90)  # shown turned a quarter counter-clockwise: upright
        for k in range(n):
            canvas = np.full((h, w, 3), 90, np.uint8)
            if faces == 0:
                canvas = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            else:
                face = renderer.render(k, rows[k])
                if faces == 1:
                    canvas[:, (w - h) // 2 + 40 : (w - h) // 2 + 40 + h] = face
                else:
                    half = cv2.resize(face, (w // faces, w // faces))
                    for i in range(faces):
                        canvas[(h - w // faces) // 2 : (h - w // faces) // 2 + w // faces, i * (w // faces) : (i + 1) * (w // faces)] = half
            if rotated:
                canvas = np.ascontiguousarray(np.rot90(canvas, -1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()
