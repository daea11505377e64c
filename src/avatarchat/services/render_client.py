"""A gateway's sessions rendered by the avatar service (server/render_api.py), over the process's one
pooled ``httpx.AsyncClient`` (the one ``HttpAvatarService`` owns).

Failures become ``MediaError``: the turn ends with an ``error`` event and the session carries on.
``abort`` never waits: the DELETE runs in the background, and the service's idle expiry catches
whatever it misses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import numpy as np

from avatarchat import metrics
from avatarchat.config import RenderServiceConfig
from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.pipeline.avatar_media import MediaError
from avatarchat.services.avatar_client import error_detail, token_refused, unreachable
from avatarchat.services.render_wire import DUE_MS, FRAMES, pack_batch

log = logging.getLogger(__name__)
UNAVAILABLE = "avatar_service_unavailable"


class RemoteStream:
    def __init__(self, owner: RemoteAvatarMedia, stream_id: str, mime: str, size: tuple[int, int]) -> None:
        self._owner = owner
        self.id = stream_id
        self.mime = mime
        self.size = size
        self.frames = 0
        self.closed = False

    def _frames(self, r: httpx.Response) -> None:
        raw = r.headers.get(FRAMES, "")
        if not raw.isdigit():
            raise MediaError("render_failed", f"avatar service answer has no {FRAMES} header")
        self.frames = int(raw)

    async def batch(self, mouth: np.ndarray, first_frame: int, audio: np.ndarray | None, *,
                    deadline: float | None = None) -> bytes:
        if self.closed:
            raise MediaError("render_failed", "the stream is closed")
        headers, body = pack_batch(mouth, first_frame, audio)
        if deadline is not None:  # relative: the two processes' clocks differ
            headers[DUE_MS] = str(max(0, round((deadline - time.perf_counter()) * 1000)))
        started = time.perf_counter()
        r = await self._owner.request("POST", f"/api/render/{self.id}/batch", content=body, headers=headers)
        # The round trip, rendering included; the frames themselves are counted by the avatar service.
        metrics.STAGE_SECONDS.labels("render_call").observe(time.perf_counter() - started)
        self._frames(r)
        return r.content

    async def close(self) -> bytes:
        if self.closed:
            return b""
        self.closed = True
        r = await self._owner.request("POST", f"/api/render/{self.id}/close")
        self._frames(r)
        return r.content

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._owner.spawn(self._owner.request("DELETE", f"/api/render/{self.id}"), f"abort {self.id}")


class RemoteAvatarMedia:
    """``AvatarMedia`` for role ``gateway``. Avatar names are reused for ``names_ttl_s``; a name not seen
    yet is always looked up, so a newly added avatar is usable at once."""

    def __init__(self, client: httpx.AsyncClient, config: RenderServiceConfig, fps: int) -> None:
        self._client = client
        self._config = config
        self._fps = fps
        self._timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, client.timeout.connect or 3.0))
        self._names: list[str] = []
        self._names_at = -float("inf")
        self._refreshing: asyncio.Future[list[str]] | None = None
        self._sizes: dict[str, tuple[int, int]] = {}
        self._idle: dict[str, asyncio.Future[bytes]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = await self._client.request(method, path, timeout=self._timeout, **kwargs)
        except httpx.HTTPError as e:
            raise MediaError(UNAVAILABLE, unreachable(e)) from e
        if r.status_code >= 400:
            detail = error_detail(r)
            code = {404: "not_found", 503: "render_busy"}.get(r.status_code, "render_failed")
            if token_refused(r) or r.status_code in (502, 504):  # the gateway's services.token, or unreachable
                code = UNAVAILABLE
            raise MediaError(code, f"avatar service ({r.status_code}): {detail}", r.status_code)
        return r

    def spawn(self, coro: Any, what: str) -> None:
        async def quietly() -> None:
            try:
                await coro
            except MediaError as e:
                log.info("render call failed", extra={"what": what, "error": str(e)})

        task = asyncio.get_running_loop().create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- names and sizes --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._names)

    async def _fetch_names(self) -> list[str]:
        r = await self.request("GET", "/api/avatar/list")
        try:
            names = [a["name"] for a in r.json()["avatars"]]
        except (ValueError, KeyError, TypeError) as e:
            raise MediaError(UNAVAILABLE, "avatar service sent an unexpected avatar list") from e
        self._names, self._names_at = names, time.monotonic()
        return names

    async def list_names(self, fresh: bool = False) -> list[str]:
        if not fresh and time.monotonic() - self._names_at < self._config.names_ttl_s:
            return list(self._names)
        if self._refreshing is None:  # concurrent callers share one request
            self._refreshing = asyncio.ensure_future(self._fetch_names())
            self._refreshing.add_done_callback(lambda _f: setattr(self, "_refreshing", None))
        return list(await asyncio.shield(self._refreshing))

    async def exists(self, name: str) -> bool:
        if name in self._names:
            try:
                return name in await self.list_names()
            except MediaError:
                return True  # known a moment ago; the turn will say if the service is really gone
        return name in await self.list_names(fresh=True)

    async def size(self, name: str) -> tuple[int, int]:
        if name in self._sizes:
            return self._sizes[name]
        try:
            r = await self.request("POST", "/api/avatar/start", json={"name": name})  # also preloads it there
        except MediaError as e:
            if e.status in (400, 404):  # a bad or unknown name
                raise UnknownAvatarError(name) from e
            raise
        body = r.json()
        size = self._sizes[name] = (int(body["width"]), int(body["height"]))
        return size

    # -- streams and clips ------------------------------------------------------------------------

    async def open(self, name: str, audio_rate: int, *, deadline: float | None = None) -> RemoteStream:
        try:
            r = await self.request("POST", "/api/render/open", json={"avatar": name, "audio_rate": audio_rate,
                                                                     "fps": self._fps})
        except MediaError as e:
            if e.code == "not_found":  # its message tells an unknown avatar from a service without the render API
                raise MediaError("unknown_avatar", str(e), e.status) from e
            raise
        try:
            body = r.json()
            stream = RemoteStream(self, str(body["id"]), str(body["mime"]), (int(body["width"]), int(body["height"])))
        except (ValueError, KeyError, TypeError) as e:
            raise MediaError("render_failed", "avatar service sent an unexpected answer to open") from e
        self._sizes[name] = stream.size
        return stream

    async def _fetch_idle(self, name: str) -> bytes:
        try:
            r = await self.request("GET", "/api/render/idle", params={"avatar": name})
        except MediaError as e:
            if e.code == "not_found":
                raise UnknownAvatarError(name) from e
            raise
        return r.content

    async def idle_clip(self, name: str) -> bytes:
        """Fetched once per avatar, like server/idle.py's IdleClips; concurrent callers share the request."""
        fut = self._idle.get(name)
        if fut is None:
            fut = self._idle[name] = asyncio.ensure_future(self._fetch_idle(name))
        try:
            return await asyncio.shield(fut)
        except Exception:
            if self._idle.get(name) is fut:
                self._idle.pop(name, None)  # not cached: the next call asks again
            raise

    def forget(self, name: str) -> None:
        self._sizes.pop(name, None)
        self._idle.pop(name, None)
        if name in self._names:
            self._names = [n for n in self._names if n != name]
        self._names_at = -float("inf")

    async def close(self) -> None:
        """Give the last aborts a moment to reach the service; the client itself is HttpAvatarService's."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)
