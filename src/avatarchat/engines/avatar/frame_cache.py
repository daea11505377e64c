"""Rendered idle frames, kept for reuse by every session of the process up to a byte budget.

A portrait's idle life (head motion, blinks) is periodic, so the head region of frame k is the same
in every turn and every session; only the mouth region changes with speech. With the idle frame
cached, a speaking frame costs one warp of the mouth region instead of the whole head (issue 13:
rendering was ~40 % of a speaking session's CPU).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

from avatarchat import metrics

_owners = itertools.count()


def owner_id() -> int:
    """A key prefix for one renderer (``id()`` could be reused by a later object)."""
    return next(_owners)


class FrameCache:
    """A thread-safe LRU of read-only frames, bounded by their bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
        metrics.IDLE_CACHE.labels("hit" if frame is not None else "miss").inc()
        return frame

    def put(self, key: Hashable, frame: np.ndarray) -> np.ndarray:
        """Keep a read-only copy of ``frame`` (unless it alone exceeds the budget); returns what is kept."""
        if frame.nbytes > self.max_bytes:
            return frame
        kept = frame.copy()
        kept.flags.writeable = False
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._frames[key] = kept
            self._bytes += kept.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= dropped.nbytes
        return kept
