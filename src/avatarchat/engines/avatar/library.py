"""The avatars this process can render: the shipped default plus a configurable directory."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from avatarchat.engines.avatar.base import AvatarRendererProtocol
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir
from avatarchat.engines.avatar.frame_cache import FrameCache
from avatarchat.engines.avatar.renderer import AvatarRenderer

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "avatar names are 1-64 letters, digits, '-' or '_', starting with a letter or digit"


def valid_name(name: str) -> bool:
    """An avatar name: also a directory name. In full: ``re.match`` with ``$`` would let a final newline through."""
    return _NAME.fullmatch(name) is not None


def portrait_or_clip(model: AvatarModel, fps: int, cache: FrameCache | None = None) -> AvatarRendererProtocol:
    """The warp engine's renderer: a video avatar's clip renderer, or the portrait's landmark warp (its idle
    frames kept in ``cache``)."""
    if model.clip is not None:
        from avatarchat.engines.avatar.clip import ClipRenderer

        return ClipRenderer(model.clip, fps=fps)
    return AvatarRenderer(model, fps=fps, cache=cache)


class UnknownAvatarError(KeyError):
    pass


RendererFactory = Callable[[AvatarModel], AvatarRendererProtocol]


class AvatarLibrary:
    def __init__(self, extra_dir: str | Path | None, fps: int, max_renderers: int = 8,
                 factory: RendererFactory | None = None, frame_cache: FrameCache | None = None) -> None:
        """``factory`` makes an avatar's renderer (engines/registry.py's AVATAR_ENGINES); default: the warp renderer,
        keeping idle frames in ``frame_cache``."""
        self._extra = Path(extra_dir) if extra_dir else None
        self._fps = fps
        self._factory: RendererFactory = factory or (lambda model: portrait_or_clip(model, fps, frame_cache))
        self._renderers: OrderedDict[str, AvatarRendererProtocol] = OrderedDict()  # least recently used first
        self._max = max_renderers
        self._lock = threading.Lock()
        # The avatars whose renderers are never dropped (the app's: its sessions', say). Called in worker
        # threads, under the lock: it must only read.
        self.in_use: Callable[[], Collection[str]] = tuple

    def _dir(self, name: str) -> Path:
        if not valid_name(name):
            raise UnknownAvatarError(name)
        if self._extra is not None and (self._extra / name / "portrait.png").is_file():
            return self._extra / name
        if name == "default":
            return default_avatar_dir()
        raise UnknownAvatarError(name)

    def names(self) -> list[str]:
        found = {"default"}
        if self._extra is not None and self._extra.is_dir():
            found |= {p.parent.name for p in self._extra.glob("*/portrait.png") if valid_name(p.parent.name)}
        return sorted(found)

    def renderer(self, name: str) -> AvatarRendererProtocol:
        """The shared renderer for ``name``, built once (precomputation takes a moment) and kept while it is
        among the ``max_renderers`` last used (~7 MB each) or in use."""
        with self._lock:
            renderer = self._renderers.get(name)
            if renderer is not None:
                self._renderers.move_to_end(name)
                return renderer
            renderer = self._renderers[name] = self._factory(AvatarModel.load(self._dir(name)))
            if (excess := len(self._renderers) - self._max) > 0:
                used = set(self.in_use())
                for old in [n for n in self._renderers if n != name and n not in used][:excess]:
                    del self._renderers[old]  # a stream rendering with it keeps its own reference
            return renderer

    def cached(self) -> list[str]:
        """The avatars whose renderers are kept, least recently used first."""
        with self._lock:
            return list(self._renderers)

    def forget(self, name: str) -> None:
        """Drop a deleted avatar's renderer."""
        with self._lock:
            self._renderers.pop(name, None)

    def poster(self, name: str) -> np.ndarray:
        return self.renderer(name).render(0, np.zeros(3, np.float32))
