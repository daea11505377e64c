"""A client-side player model for benches: how much video a turn's fMP4 stream has delivered, and when
a player with a start-up buffer would have stalled.

The server's binary frames carry one fMP4 byte stream per turn, split anywhere; top-level boxes are
parsed as they complete. The video track is found from the init segment (``hdlr`` = ``vide``); each
``moof`` adds its video ``trun`` sample durations (``tfhd``/``trex`` defaults when absent).
"""

from __future__ import annotations

import struct
import time


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, i + 8)[0]
            header = 16
        if size < header or i + size > end:
            return
        yield kind.decode("latin-1"), i + header, i + size
        i += size


class Player:
    """Feed it a turn's payloads in order; it reports delivered media and stalls."""

    def __init__(self, buffer_ms: float = 300.0) -> None:
        self.buffer_ms = buffer_ms
        self._pending = b""
        self._video_track: int | None = None
        self._timescale: dict[int, int] = {}
        self._default_duration: dict[int, int] = {}
        self.media_ms = 0.0  # video delivered
        self.first_at: float | None = None
        self._play_start: float | None = None  # when playback (re)started, adjusted for stalls
        self.stalls = 0
        self.stall_ms = 0.0
        self.stall_at: list[tuple[int, int]] = []  # (media ms where it ran dry, how long)

    def feed(self, payload: bytes, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._pending += payload
        consumed = 0
        for kind, body, end in _boxes(self._pending):
            consumed = end
            if kind == "moov":
                self._init(self._pending, body, end)
            elif kind == "moof":
                self._arrive(self._moof_ms(self._pending, body, end), now)
        self._pending = self._pending[consumed:]

    def _arrive(self, ms: float, now: float) -> None:
        if ms <= 0:
            return
        if self.first_at is None:
            self.first_at = now
            self._play_start = now + self.buffer_ms / 1000
        else:
            assert self._play_start is not None
            played = (now - self._play_start) * 1000
            if played > self.media_ms:  # the player ran dry before this fragment came: a stall
                self.stalls += 1
                self.stall_ms += played - self.media_ms
                self.stall_at.append((round(self.media_ms), round(played - self.media_ms)))
                self._play_start += (played - self.media_ms) / 1000 + self.buffer_ms / 1000  # it rebuffers
        self.media_ms += ms

    def _init(self, data: bytes, start: int, end: int) -> None:
        for kind, body, bend in _boxes(data, start, end):
            if kind == "trak":
                track, scale, handler = None, None, None
                for k2, b2, e2 in _boxes(data, body, bend):
                    if k2 == "tkhd":
                        version = data[b2]
                        track = struct.unpack_from(">I", data, b2 + (20 if version == 1 else 12))[0]
                    elif k2 == "mdia":
                        for k3, b3, e3 in _boxes(data, b2, e2):
                            if k3 == "mdhd":
                                version = data[b3]
                                scale = struct.unpack_from(">I", data, b3 + (20 if version == 1 else 12))[0]
                            elif k3 == "hdlr":
                                handler = data[b3 + 8 : b3 + 12].decode("latin-1")
                if track is not None and scale:
                    self._timescale[track] = scale
                    if handler == "vide":
                        self._video_track = track
            elif kind == "mvex":
                for k2, b2, _ in _boxes(data, body, bend):
                    if k2 == "trex":
                        track, _, duration = struct.unpack_from(">III", data, b2 + 4)
                        self._default_duration[track] = duration

    def _moof_ms(self, data: bytes, start: int, end: int) -> float:
        total = 0.0
        for kind, body, bend in _boxes(data, start, end):
            if kind != "traf":
                continue
            track, default = None, None
            for k2, b2, _ in _boxes(data, body, bend):
                if k2 == "tfhd":
                    flags = int.from_bytes(data[b2 + 1 : b2 + 4], "big")
                    track = struct.unpack_from(">I", data, b2 + 4)[0]
                    off = b2 + 8 + (8 if flags & 0x1 else 0) + (4 if flags & 0x2 else 0)
                    if flags & 0x8:
                        default = struct.unpack_from(">I", data, off)[0]
                elif k2 == "trun" and track == self._video_track:
                    flags = int.from_bytes(data[b2 + 1 : b2 + 4], "big")
                    count = struct.unpack_from(">I", data, b2 + 4)[0]
                    off = b2 + 8 + (4 if flags & 0x1 else 0) + (4 if flags & 0x4 else 0)
                    per = (4 if flags & 0x100 else 0) + (4 if flags & 0x200 else 0) + (4 if flags & 0x400 else 0) \
                        + (4 if flags & 0x800 else 0)
                    duration = default or self._default_duration.get(track, 0)
                    ticks = 0
                    for n in range(count):
                        ticks += struct.unpack_from(">I", data, off + n * per)[0] if flags & 0x100 else duration
                    total += ticks * 1000 / self._timescale.get(track, 1)
        return total
