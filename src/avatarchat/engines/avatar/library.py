"""The avatars this process can render: the shipped default plus a configurable directory."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avatarchat.engines.avatar.base import AvatarRendererProtocol
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir
from avatarchat.engines.avatar.renderer import AvatarRenderer

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class UnknownAvatarError(KeyError):
    pass


RendererFactory = Callable[[AvatarModel], AvatarRendererProtocol]


class AvatarLibrary:
    def __init__(self, extra_dir: str | Path | None, fps: int, factory: RendererFactory | None = None) -> None:
        """``factory`` makes an avatar's renderer (engines/registry.py's AVATAR_ENGINES); default: the warp renderer."""
        self._extra = Path(extra_dir) if extra_dir else None
        self._fps = fps
        self._factory: RendererFactory = factory or (lambda model: AvatarRenderer(model, fps=fps))
        self._renderers: dict[str, AvatarRendererProtocol] = {}
        self._lock = threading.Lock()

    def _dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise UnknownAvatarError(name)
        if self._extra is not None and (self._extra / name / "portrait.png").is_file():
            return self._extra / name
        if name == "default":
            return default_avatar_dir()
        raise UnknownAvatarError(name)

    def names(self) -> list[str]:
        found = {"default"}
        if self._extra is not None and self._extra.is_dir():
            found |= {p.parent.name for p in self._extra.glob("*/portrait.png") if _NAME.match(p.parent.name)}
        return sorted(found)

    def renderer(self, name: str) -> AvatarRendererProtocol:
        """The shared renderer for ``name``, built once (precomputation takes a moment)."""
        with self._lock:
            if name not in self._renderers:
                self._renderers[name] = self._factory(AvatarModel.load(self._dir(name)))
            return self._renderers[name]

    def forget(self, name: str) -> None:
        """Drop a deleted avatar's renderer."""
        with self._lock:
            self._renderers.pop(name, None)

    def poster(self, name: str) -> np.ndarray:
        return self.renderer(name).render(0, np.zeros(3, np.float32))
