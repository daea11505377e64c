"""Avatar models: a portrait and its MediaPipe face-mesh landmarks, stored as files.

Landmarks are computed once, when an avatar is created, so rendering never needs MediaPipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from avatarchat.engines.avatar.clip import AvatarClip

# Face-mesh indices used to frame the portrait.
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 33, 263
FOREHEAD, CHIN = 10, 152

_mesh_lock = threading.Lock()


class NoFaceError(ValueError):
    """No face was found in the image."""


@dataclass(frozen=True)
class AvatarModel:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    landmarks: np.ndarray  # (N, 2) float32 pixel coordinates, N = 468 or 478
    clip: AvatarClip | None = None  # a video avatar's clip (engines/avatar/clip.py); the portrait is one of its frames

    @classmethod
    def load(cls, directory: Path) -> AvatarModel:
        portrait = directory / "portrait.png"
        bgr = cv2.imread(str(portrait), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"no readable portrait at {portrait}")
        data = json.loads((directory / "landmarks.json").read_text(encoding="utf-8"))
        landmarks = np.asarray(data["landmarks"], np.float32)
        meta_path = directory / "meta.json"
        name = directory.name
        if meta_path.is_file():
            name = json.loads(meta_path.read_text(encoding="utf-8")).get("name", name)
        if landmarks.ndim != 2 or landmarks.shape[1] != 2 or len(landmarks) < 468:
            raise ValueError(f"{directory / 'landmarks.json'} does not hold face-mesh landmarks")
        from avatarchat.engines.avatar.clip import AvatarClip

        return cls(name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), landmarks, AvatarClip.load(directory))

    def save(self, directory: Path, meta: dict[str, str] | None = None) -> None:
        """Write atomically: a crash leaves either the old avatar or the new one, never half of one."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            ok, png = cv2.imencode(".png", cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise ValueError("could not encode the portrait as PNG")
            (tmp / "portrait.png").write_bytes(png.tobytes())
            h, w = self.image.shape[:2]
            lm = {"width": w, "height": h, "landmarks": np.round(self.landmarks, 2).tolist()}
            (tmp / "landmarks.json").write_text(json.dumps(lm), encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps({"name": self.name, **(meta or {})}), encoding="utf-8")
            if self.clip is not None:
                self.clip.save(tmp)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if directory.exists():
                old = directory.with_name(f".{directory.name}-old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def default_avatar_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "avatars" / "default"


def detect_landmarks(image: np.ndarray) -> np.ndarray:
    """Face-mesh landmarks (478 points with irises) of the one face in an RGB image."""
    import mediapipe as mp  # slow import: only when creating avatars

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("expected an RGB uint8 image")
    with _mesh_lock, mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.5
    ) as mesh:
        result = mesh.process(np.ascontiguousarray(image))
    if not result.multi_face_landmarks:
        raise NoFaceError("no face found in the image")
    h, w = image.shape[:2]
    pts = [(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark]
    return np.asarray(pts, np.float32)


def create_avatar(image: np.ndarray, name: str, size: int = 512) -> AvatarModel:
    """Frame a portrait around its face (face about half the height, eyes ~40 % from the top)."""
    lm = detect_landmarks(image)
    face_h = float(np.linalg.norm(lm[CHIN] - lm[FOREHEAD]))
    eyes = (lm[LEFT_EYE_OUTER] + lm[RIGHT_EYE_OUTER]) / 2
    side = face_h / 0.5
    x0 = eyes[0] - side / 2
    y0 = eyes[1] - 0.42 * side
    # Affine crop with replicated borders: a face near the image edge still gets a full square.
    scale = size / side
    m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return AvatarModel(name, crop, detect_landmarks(crop))
