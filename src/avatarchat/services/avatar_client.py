"""The avatar service behind one interface: in-process when co-located, over pooled HTTP from a gateway.

``LocalAvatarService`` does the work (store, renderer, WebRTC peers). ``HttpAvatarService`` sends the
same calls to a remote avatar service with one ``httpx.AsyncClient`` per process (bounded pool,
keep-alive, separate connect/read/write/pool timeouts), closed on shutdown. Both raise
``AvatarServiceError`` with the HTTP status that fits, so the routes in server/avatar_api.py are the
same in every role.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

import cv2
import httpx
import numpy as np

from avatarchat.config import AvatarClientConfig
from avatarchat.engines.avatar.library import AvatarLibrary, UnknownAvatarError
from avatarchat.net.http_transport import HttpTransport
from avatarchat.redact import redact_url
from avatarchat.services.avatar_store import AvatarStore, AvatarStoreError, check_name
from avatarchat.services.webrtc import PeerManager, WebRTCError

T = TypeVar("T")
MAX_RESPONSE_BODY = 64 * 1024 * 1024  # an avatar service answer larger than this is an error, not buffered
# A relayed answer goes to the client as it is, so it must come unencoded (identity).
_RELAY_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": "avatarchat-gateway"}


class AvatarServiceError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def unreachable(e: httpx.HTTPError) -> str:
    """What a transport failure on the way to the avatar service says."""
    if isinstance(e, httpx.TimeoutException):
        return f"avatar service timed out ({type(e).__name__})"
    return redact_url(f"avatar service unreachable: {type(e).__name__}: {e}")


def error_detail(r: httpx.Response) -> str:
    """The message of an avatar service error answer (read): its JSON ``detail``, else its text."""
    try:
        body = r.json()
        return str(body.get("detail", r.text)) if isinstance(body, dict) else r.text[:500]
    except ValueError:
        return r.text[:500]


def token_refused(r: httpx.Response) -> bool:
    """The avatar service's token check refused this gateway (server/service_auth.py: 401 with
    ``www-authenticate: Bearer``): a gateway misconfiguration, unlike a 403 about the request itself."""
    return r.status_code == 401 and r.headers.get("www-authenticate", "").startswith("Bearer")


def _unreachable(e: httpx.HTTPError) -> AvatarServiceError:
    return AvatarServiceError(504 if isinstance(e, httpx.TimeoutException) else 502, unreachable(e))


def _failed(r: httpx.Response) -> AvatarServiceError:
    """An avatar service error answer (read) as the error the gateway answers with."""
    detail = error_detail(r)
    if token_refused(r):  # the gateway's credentials, not the user's
        return AvatarServiceError(502, f"avatar service refused this gateway (services.token): {detail}")
    # 503 (at capacity) keeps its meaning; any other upstream failure is a bad gateway.
    status = r.status_code if r.status_code < 500 or r.status_code == 503 else 502
    return AvatarServiceError(status, f"avatar service: {detail}")


class AvatarService(Protocol):
    async def list(self) -> dict[str, Any]: ...
    async def preview(self, name: str, size: int) -> bytes: ...
    async def add(self, name: str, data: bytes, filename: str) -> dict[str, Any]: ...
    async def delete(self, name: str) -> dict[str, Any]: ...
    async def start(self, name: str) -> dict[str, Any]: ...
    async def tts_models(self) -> dict[str, Any]: ...
    async def webrtc_offer(self, offer: dict[str, str]) -> dict[str, Any]: ...
    async def webrtc_close(self, peer_id: str) -> dict[str, Any]: ...
    async def health(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class LocalAvatarService:
    """The avatar service's own implementation, called in-process (roles ``all`` and ``avatar``)."""

    def __init__(self, store: AvatarStore, avatars: AvatarLibrary, background: Executor, fps: int,
                 tts_info: Callable[[], dict[str, Any]], max_peers: int) -> None:
        self._store = store
        self._avatars = avatars
        # Uploads (face detection on full-size images), previews and WebRTC idle frames: background work,
        # on the scheduler's low-priority pool, so they never delay a live turn (issue 13).
        self._workers = background
        self._fps = fps
        self._tts_info = tts_info
        self.peers = PeerManager(self._idle_frames, fps, max_peers, self._run)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def _idle_frames(self, name: str) -> list[np.ndarray]:
        try:
            return list(self._avatars.renderer(name).idle_frames())
        except UnknownAvatarError as e:
            raise WebRTCError(404, f"no avatar named {name!r}") from e

    def _known(self, name: str) -> None:
        try:
            check_name(name)
        except AvatarStoreError as e:
            raise AvatarServiceError(e.status, str(e)) from e
        if not self._store.exists(name):
            raise AvatarServiceError(404, f"no avatar named {name!r}")

    async def list(self) -> dict[str, Any]:
        return {"avatars": [a.as_dict() for a in self._store.list()]}

    async def preview(self, name: str, size: int) -> bytes:
        self._known(name)

        def thumbnail() -> bytes:
            frame = self._avatars.poster(name)
            small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
            ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError("PNG encoding failed")
            return png.tobytes()

        try:
            return await self._run(thumbnail)
        except UnknownAvatarError as e:
            raise AvatarServiceError(404, f"no avatar named {name!r}") from e

    async def add(self, name: str, data: bytes, filename: str) -> dict[str, Any]:
        if len(data) > self._store.max_upload_bytes:
            raise AvatarServiceError(413, f"upload is over the {self._store.max_upload_bytes}-byte limit")
        try:
            info = await self._run(self._store.add, name, data, filename)
        except AvatarStoreError as e:
            raise AvatarServiceError(e.status, str(e)) from e
        return info.as_dict()

    async def delete(self, name: str) -> dict[str, Any]:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._store.delete, name)
        except AvatarStoreError as e:
            raise AvatarServiceError(e.status, str(e)) from e
        self._avatars.forget(name)
        self.peers.forget(name)
        return {"deleted": name}

    async def start(self, name: str) -> dict[str, Any]:
        """Preload an avatar's renderer, so the session that uses it starts at once."""
        self._known(name)
        renderer = await self._run(self._avatars.renderer, name)
        width, height = renderer.size
        return {"name": name, "ready": True, "width": width, "height": height, "fps": self._fps}

    async def tts_models(self) -> dict[str, Any]:
        return self._tts_info()

    async def webrtc_offer(self, offer: dict[str, str]) -> dict[str, Any]:
        try:
            return await self.peers.offer(offer)
        except WebRTCError as e:
            raise AvatarServiceError(e.status, str(e)) from e

    async def webrtc_close(self, peer_id: str) -> dict[str, Any]:
        if not await self.peers.close(peer_id):
            raise AvatarServiceError(404, f"no WebRTC peer {peer_id!r}")
        return {"closed": peer_id}

    async def health(self) -> dict[str, Any]:
        return {"where": "in-process", "ok": True, "peers": len(self.peers)}

    async def close(self) -> None:
        await self.peers.close_all()


class HttpAvatarService:
    """A remote avatar service, reached with one pooled client per process (role ``gateway``)."""

    def __init__(self, config: AvatarClientConfig, transport: httpx.AsyncBaseTransport | None = None,
                 token: str = "") -> None:
        self.url = config.url.rstrip("/")
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry_s,
        )
        self._transport = transport or HttpTransport(limits, max_body=MAX_RESPONSE_BODY)
        self._client = httpx.AsyncClient(
            base_url=self.url,
            limits=limits,
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s, read=config.read_timeout_s,
                write=config.write_timeout_s, pool=config.pool_timeout_s,
            ),
            # httpcore's pool slows down badly with hundreds of requests in flight (net/http_transport.py).
            transport=self._transport,
            follow_redirects=False,  # a redirect must not carry the gateway somewhere else
            headers={"Authorization": f"Bearer {token}"} if token else None,  # services.token (server/service_auth.py)
        )
        self._relay_headers = {**_RELAY_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
        self._relay_requests: dict[str, httpx.Request] = {}
        self._timeouts = {"timeout": self._client.timeout.as_dict()}

    @property
    def closed(self) -> bool:
        return self._client.is_closed

    @property
    def client(self) -> httpx.AsyncClient:
        """The process's one pooled client to the avatar service, shared with services/render_client.py."""
        return self._client

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise _unreachable(e) from e
        if r.status_code >= 400:
            raise _failed(r)
        return r

    async def relay(self, path: str, query: bytes = b"") -> httpx.Response:
        """GET ``path`` for a caller that streams the answer on as it is (server/relay.py); it must close it.

        It goes through the client's own transport: the same pool, limits and timeouts, without the
        client's auth, redirect and cookie steps, which a fixed internal GET does not use. The request
        (URL, headers) is built once per path: with a thousand requests in flight, building and parsing
        it per call was a good part of the gateway's CPU per relayed request (bench/forwarding).
        """
        if query:
            request = httpx.Request("GET", self._client.base_url.join(path).copy_with(query=query),
                                    headers=self._relay_headers, extensions=self._timeouts)
        else:
            request = self._relay_requests.get(path)  # sent as is, never changed: safe to share
            if request is None:
                request = httpx.Request("GET", self._client.base_url.join(path), headers=self._relay_headers,
                                        extensions=self._timeouts)
                self._relay_requests[path] = request
        try:
            r = await self._transport.handle_async_request(request)
        except httpx.HTTPError as e:
            raise _unreachable(e) from e
        if r.status_code >= 400:
            try:
                await r.aread()
            except httpx.HTTPError as e:
                raise _unreachable(e) from e
            finally:
                await r.aclose()
            raise _failed(r)
        return r

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        r = await self._call(method, path, **kwargs)
        try:
            body = r.json()
        except ValueError as e:
            raise AvatarServiceError(502, "avatar service sent a non-JSON answer") from e
        if not isinstance(body, dict):
            raise AvatarServiceError(502, "avatar service sent an unexpected answer")
        return body

    async def list(self) -> dict[str, Any]:
        return await self._json("GET", "/api/avatar/list")

    async def preview(self, name: str, size: int) -> bytes:
        r = await self._call("GET", "/api/avatar/preview", params={"name": name, "size": size})
        return r.content

    async def add(self, name: str, data: bytes, filename: str) -> dict[str, Any]:
        return await self._json("POST", "/api/avatar/add", data={"name": name}, files={"file": (filename, data)})

    async def delete(self, name: str) -> dict[str, Any]:
        return await self._json("POST", "/api/avatar/delete", json={"name": name})

    async def start(self, name: str) -> dict[str, Any]:
        return await self._json("POST", "/api/avatar/start", json={"name": name})

    async def tts_models(self) -> dict[str, Any]:
        return await self._json("GET", "/api/tts/models")

    async def webrtc_offer(self, offer: dict[str, str]) -> dict[str, Any]:
        return await self._json("POST", "/api/webrtc/offer", json=offer)

    async def webrtc_close(self, peer_id: str) -> dict[str, Any]:
        # peer_id was matched against [A-Za-z0-9_-]{1,64} by webrtc.resolve: it cannot change the path.
        return await self._json("DELETE", f"/api/webrtc/peers/{peer_id}")

    async def health(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            # An /api route, not /health: it also proves this gateway's services.token is accepted, and that
            # the service renders (role avatar).
            r = await self._client.get("/api/render/status", timeout=2.0)
            ok = r.status_code == 200
            error = None if ok else f"HTTP {r.status_code}" + (" (services.token refused)" if token_refused(r) else "")
        except httpx.HTTPError as e:
            ok, error = False, redact_url(f"{type(e).__name__}: {e}")
        out: dict[str, Any] = {"where": redact_url(self.url), "ok": ok, "ms": round(1000 * (time.perf_counter() - start), 1)}
        if error:
            out["error"] = error
        return out

    async def close(self) -> None:
        await self._client.aclose()
