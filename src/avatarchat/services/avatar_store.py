"""Avatars people upload: validated, framed around the face, stored atomically (files) with metadata in SQLite.

The files are the avatar (``portrait.png`` + ``landmarks.json``, written to a temporary directory and
renamed into place by ``AvatarModel.save``); the SQLite row is written after the rename. On open,
directories without a row (a crash between the two) and stray temporary directories are removed,
so a crash during an upload never leaves a half-made avatar. A delete moves the files aside before
the row goes (rows without files are removed on open too), and a delete that fails changes nothing.
"""

from __future__ import annotations

import io
import shutil
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from avatarchat.config import ClipConfig
from avatarchat.engines.avatar.clip import CLIP_FILE, ClipError, ClipLimits, make_clip
from avatarchat.engines.avatar.face import AvatarModel, NoFaceError, create_avatar
from avatarchat.engines.avatar.library import NAME_RULE, valid_name

BUILTIN = "default"
FORMATS = {"PNG", "JPEG", "WEBP"}


class AvatarStoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status that fits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AvatarInfo:
    name: str
    builtin: bool
    created: float
    width: int
    height: int
    source: str  # the uploaded file's name, or "builtin"
    video: bool = False  # made from a video clip

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "builtin": self.builtin, "created": self.created, "width": self.width,
                "height": self.height, "source": self.source, "video": self.video}


def clip_limits(c: ClipConfig) -> ClipLimits | None:
    """What the store accepts as a video avatar (None: no video avatars)."""
    if not c.enabled:
        return None
    return ClipLimits(min_s=c.min_s, max_s=c.max_s, max_frame_pixels=c.max_frame_pixels, loop_s=c.loop_s)


def is_image(data: bytes) -> bool:
    """Does the upload claim to be an image (of any format Pillow knows)? Otherwise it may be a video clip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)):
                return True
    except UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 - an image Pillow refuses (a bomb): decode_image says why
        return True


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → RGB uint8, refusing non-images, unsupported formats, decompression bombs and truncated files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size  # read from the header, before any pixel is decoded
            if fmt not in FORMATS:
                raise AvatarStoreError(415, f"unsupported image format {fmt}; use PNG, JPEG or WebP")
            if w * h > max_pixels:
                raise AvatarStoreError(413, f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
            img.load()
    except AvatarStoreError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise AvatarStoreError(413, f"image is too large to decode safely: {e}") from e
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError; so is a truncated file
        raise AvatarStoreError(400, f"not a readable image: {e}") from e
    if w < 64 or h < 64:
        raise AvatarStoreError(422, f"image is {w}×{h}; a portrait needs at least 64×64 pixels")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class AvatarStore:
    def __init__(self, directory: str | Path, *, max_upload_bytes: int, max_pixels: int, size: int = 512,
                 max_avatars: int = 200, clip: ClipLimits | None = None, max_clip_bytes: int = 0, fps: int = 25) -> None:
        """``clip``: accept video clips within these limits (None: portraits only)."""
        self.dir = Path(directory)
        self.max_image_bytes = max_upload_bytes
        self.clip = clip
        self.max_clip_bytes = max_clip_bytes if clip is not None else 0
        self.max_upload_bytes = max(max_upload_bytes, self.max_clip_bytes)  # either kind
        self.fps = fps
        self.max_pixels = max_pixels
        self.max_avatars = max_avatars
        self.size = size
        self._lock = threading.Lock()  # one writer at a time; SQLite and the rename need no more
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "avatars.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS avatars (name TEXT PRIMARY KEY, created REAL NOT NULL, "
            "width INTEGER NOT NULL, height INTEGER NOT NULL, source TEXT NOT NULL)"
        )
        self._reconcile()

    def _reconcile(self) -> None:
        rows = {r[0] for r in self._db.execute("SELECT name FROM avatars")}
        for path in self.dir.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(".") or path.name not in rows or not (path / "portrait.png").is_file():
                shutil.rmtree(path, ignore_errors=True)  # an interrupted upload or delete
        for name in rows - {p.name for p in self.dir.iterdir() if p.is_dir()}:
            self._db.execute("DELETE FROM avatars WHERE name = ?", (name,))

    def close(self) -> None:
        self._db.close()

    def list(self) -> list[AvatarInfo]:
        rows = self._db.execute("SELECT name, created, width, height, source FROM avatars ORDER BY created").fetchall()
        return [AvatarInfo(BUILTIN, True, 0.0, self.size, self.size, "builtin")] + [
            AvatarInfo(n, False, c, w, h, s, (self.dir / n / CLIP_FILE).is_file()) for n, c, w, h, s in rows
        ]

    def exists(self, name: str) -> bool:
        return name == BUILTIN or self._db.execute("SELECT 1 FROM avatars WHERE name = ?", (name,)).fetchone() is not None

    def add(self, name: str, data: bytes, source: str = "upload") -> AvatarInfo:
        """Validate, detect the face, frame and store. Blocking CPU work (~0.1-0.5 s): call it off the loop."""
        check_name(name)
        if len(data) > self.max_upload_bytes:
            raise AvatarStoreError(413, f"upload is {len(data)} bytes; the limit is {self.max_upload_bytes}")
        if self.exists(name):
            raise AvatarStoreError(409, f"an avatar named {name!r} already exists")
        self._check_room()
        model = self._image_avatar(name, data) if self.clip is None or is_image(data) else self._clip_avatar(name, data)
        with self._lock:
            if self.exists(name):
                raise AvatarStoreError(409, f"an avatar named {name!r} already exists")
            self._check_room()  # again: another upload may have taken the last place meanwhile
            model.save(self.dir / name, meta={"source": source[:200]})
            created = time.time()
            self._db.execute(
                "INSERT INTO avatars (name, created, width, height, source) VALUES (?, ?, ?, ?, ?)",
                (name, created, self.size, self.size, source[:200]),
            )
        return AvatarInfo(name, False, created, self.size, self.size, source[:200], model.clip is not None)

    def _image_avatar(self, name: str, data: bytes) -> AvatarModel:
        if len(data) > self.max_image_bytes:
            raise AvatarStoreError(413, f"the image is {len(data)} bytes; the limit is {self.max_image_bytes}")
        rgb = decode_image(data, self.max_pixels)
        try:
            return create_avatar(rgb, name, size=self.size)
        except NoFaceError as e:
            raise AvatarStoreError(422, f"no face found in the image: {e}") from e

    def _clip_avatar(self, name: str, data: bytes) -> AvatarModel:
        assert self.clip is not None
        if len(data) > self.max_clip_bytes:
            raise AvatarStoreError(413, f"the video is {len(data)} bytes; the limit is {self.max_clip_bytes}")
        try:
            portrait, landmarks, clip = make_clip(data, self.fps, self.size, self.clip)
        except ClipError as e:
            if e.status == 415:  # neither an image nor a video
                raise AvatarStoreError(415, f"not an image or a video: upload a PNG, JPEG or WebP portrait, or a "
                                            f"{self.clip.min_s:g}–{self.clip.max_s:g} s video of a person ({e})") from e
            raise AvatarStoreError(e.status, str(e)) from e
        return AvatarModel(name, portrait, landmarks, clip)

    def _check_room(self) -> None:
        stored = self._db.execute("SELECT COUNT(*) FROM avatars").fetchone()[0]
        if stored >= self.max_avatars:
            raise AvatarStoreError(
                409, f"the store holds its limit of {self.max_avatars} avatars (avatar.max_avatars); delete one first")

    def delete(self, name: str) -> None:
        check_name(name)
        if name == BUILTIN:
            raise AvatarStoreError(403, "the built-in avatar cannot be deleted")
        with self._lock:
            if not self.exists(name):
                raise AvatarStoreError(404, f"no avatar named {name!r}")
            # All or nothing: the files are moved aside before the row goes, so a directory that refuses the
            # rename (read-only) leaves the avatar whole, and a row that cannot go gets its files back. A crash
            # in between leaves a row without files and a hidden directory: the next open removes both.
            trash = self.dir / f".deleted-{name}-{time.monotonic_ns()}"
            try:
                (self.dir / name).rename(trash)
            except OSError as e:
                raise AvatarStoreError(500, f"could not delete avatar {name!r}: {e.strerror or e}") from e
            try:
                self._db.execute("DELETE FROM avatars WHERE name = ?", (name,))
            except sqlite3.Error as e:
                trash.rename(self.dir / name)
                raise AvatarStoreError(500, f"could not delete avatar {name!r}: {e}") from e
            shutil.rmtree(trash, ignore_errors=True)

    def load(self, name: str) -> AvatarModel:
        return AvatarModel.load(self.dir / name)


def check_name(name: str) -> None:
    if not valid_name(name):
        raise AvatarStoreError(400, NAME_RULE)
