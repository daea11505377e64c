"""WebRTC signalling for the avatar service, and the allow-list the gateway's proxy checks.

The avatar service answers an SDP offer with a video track of the avatar (its idle loop, rendered
once per avatar and cached) and closes peers on request. The proxy at ``/api/webrtc/<path>`` is not a
generic forwarder: ``resolve`` maps the raw request path onto one of these known routes or refuses it,
and the forwarding client builds the upstream URL from the resolved route alone.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame

log = logging.getLogger(__name__)

PREFIX = "/api/webrtc/"
_PEER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_CLOCK = 90000  # RTP video clock


class WebRTCError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WebRTCRoute:
    kind: Literal["offer", "close"]
    peer_id: str | None = None


def resolve(method: str, raw_path: str) -> WebRTCRoute:
    """The known route ``raw_path`` (the undecoded request path) names, or a WebRTCError (400/404/405)."""
    if not raw_path.startswith(PREFIX):
        raise WebRTCError(404, "unknown WebRTC route")
    rest = raw_path[len(PREFIX):]
    if "%" in rest or "\\" in rest:
        raise WebRTCError(400, "encoded or escaped characters are not allowed in WebRTC paths")
    parts = rest.split("/")
    if any(p in ("", ".", "..") for p in parts) or ":" in rest:
        raise WebRTCError(400, "WebRTC paths are plain relative names: no traversal, no empty segments, no URLs")
    if not all(_SEGMENT.fullmatch(p) for p in parts):
        raise WebRTCError(400, "WebRTC path segments may hold only letters, digits, '-' and '_'")
    if parts == ["offer"]:
        if method != "POST":
            raise WebRTCError(405, "use POST for /api/webrtc/offer")
        return WebRTCRoute("offer")
    if len(parts) == 2 and parts[0] == "peers" and _PEER_ID.fullmatch(parts[1]):
        if method != "DELETE":
            raise WebRTCError(405, "use DELETE for /api/webrtc/peers/<id>")
        return WebRTCRoute("close", parts[1])
    raise WebRTCError(404, f"unknown WebRTC route {rest!r}; known: POST offer, DELETE peers/<id>")


def check_offer(body: Any) -> dict[str, str]:
    if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        raise WebRTCError(400, 'the body must be {"type": "offer", "sdp": "...", "avatar": "<name>"}')
    if len(body["sdp"]) > 64 * 1024:
        raise WebRTCError(413, "SDP offer is over 64 KiB")
    avatar = body.get("avatar", "default")
    if not isinstance(avatar, str):
        raise WebRTCError(400, "avatar must be a string")
    return {"type": "offer", "sdp": body["sdp"], "avatar": avatar}


class LoopTrack(VideoStreamTrack):  # type: ignore[misc]
    """A video track that plays a list of frames in a loop at ``fps``."""

    def __init__(self, frames: list[np.ndarray], fps: int) -> None:
        super().__init__()
        self._frames = frames
        self._fps = fps
        self._i = 0
        self._start: float | None = None

    async def recv(self) -> VideoFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        # Paced from the start time, so the stream keeps its rate however long a frame took.
        wait = self._start + self._i / self._fps - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = VideoFrame.from_ndarray(self._frames[self._i % len(self._frames)], format="rgb24")
        frame.pts = self._i * (_CLOCK // self._fps)
        frame.time_base = fractions.Fraction(1, _CLOCK)
        self._i += 1
        return frame


class PeerManager:
    """The avatar service's peers: at most ``max_peers``, each with one looping avatar video track."""

    def __init__(self, frames_for: Callable[[str], list[np.ndarray]], fps: int, max_peers: int,
                 run_in_worker: Callable[..., Any]) -> None:
        self._frames_for = frames_for
        self._fps = fps
        self._max = max_peers
        self._run = run_in_worker
        self._peers: dict[str, Any] = {}
        self._frames: dict[str, list[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def forget(self, avatar: str) -> None:
        self._frames.pop(avatar, None)

    async def offer(self, body: dict[str, str]) -> dict[str, str]:
        if len(self._peers) >= self._max:
            raise WebRTCError(503, f"the avatar service streams to at most {self._max} peers")
        avatar = body["avatar"]
        frames = self._frames.get(avatar)
        if frames is None:
            frames = await self._run(self._frames_for, avatar)
            self._frames[avatar] = frames
        pc = RTCPeerConnection()
        peer_id = uuid.uuid4().hex
        self._peers[peer_id] = pc

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(peer_id)

        try:
            pc.addTrack(LoopTrack(frames, self._fps))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await self.close(peer_id)
            raise WebRTCError(400, f"bad SDP offer: {type(e).__name__}: {e}") from e
        log.info("webrtc peer opened", extra={"peer": peer_id, "avatar": avatar})
        return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp, "peer": peer_id}

    async def close(self, peer_id: str) -> bool:
        pc = self._peers.pop(peer_id, None)
        if pc is None:
            return False
        await pc.close()
        log.info("webrtc peer closed", extra={"peer": peer_id})
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(p) for p in list(self._peers)), return_exceptions=True)
