"""The avatar service's render API, used by gateways (services/render_client.py) to have their sessions'
turns rendered here. Mounted in role ``avatar`` only: not in ``all`` (which renders its own sessions
in-process and faces users) nor on a gateway, and not reachable through the WebRTC proxy's allow-list.
Like the rest of the avatar service's API it has no authentication: keep the avatar service's port on the
internal network. Its limits bound what any caller can take.

    POST   /api/render/open          {"avatar", "audio_rate", "fps"?} → 201 {"id", "mime", "width", "height", "fps"}
    POST   /api/render/{id}/batch    float32 mouth rows + PCM (services/render_wire.py) → fMP4 bytes, x-render-frames
    POST   /api/render/{id}/close    → the last fMP4 bytes, x-render-frames (with the frames repeated for the AAC tail)
    DELETE /api/render/{id}          drop a stream (a stopped turn)
    GET    /api/render/idle?avatar=  the avatar's idle loop (MP4)
    GET    /api/render/status        open streams, limits, frames rendered
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.pipeline.avatar_media import AvatarMedia, MediaError
from avatarchat.services.render_streams import RenderStreams
from avatarchat.services.render_wire import FRAMES, RenderRequestError, batch_shape, due_ms, max_body, unpack_batch

router = APIRouter(prefix="/api/render", include_in_schema=False)
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_FMP4 = "application/octet-stream"


class OpenBody(BaseModel):
    avatar: str = Field(min_length=1, max_length=64)
    audio_rate: int
    fps: int | None = None


def _streams(request: Request) -> RenderStreams:
    return request.app.state.render  # type: ignore[no-any-return]


def _fail(e: RenderRequestError) -> HTTPException:
    return HTTPException(e.status, str(e))


def _checked_id(stream_id: str) -> str:
    if not _ID.fullmatch(stream_id):
        raise HTTPException(404, "no such render stream")
    return stream_id


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body is over the {limit}-byte limit")
    return bytes(body)


@router.post("/open", status_code=201)
async def open_stream(request: Request, body: OpenBody) -> dict[str, Any]:
    try:
        return await _streams(request).open(body.avatar, body.audio_rate, body.fps)
    except RenderRequestError as e:
        raise _fail(e) from e


@router.post("/{stream_id}/batch")
async def batch(request: Request, stream_id: str) -> Response:
    streams = _streams(request)
    c = streams.config
    try:
        frames, first, samples = batch_shape(request.headers, c.max_batch_frames, c.max_batch_samples)
        due = due_ms(request.headers)
        body = await _read_body(request, max_body(c.max_batch_frames, c.max_batch_samples))
        mouth, audio = unpack_batch(body, frames, samples)
        deadline = None if due is None else time.perf_counter() + due / 1000
        data, total = await streams.batch(_checked_id(stream_id), mouth, first, audio, deadline)
    except RenderRequestError as e:
        raise _fail(e) from e
    except MediaError as e:
        raise HTTPException(500, str(e)) from e
    return Response(data, media_type=_FMP4, headers={FRAMES: str(total)})


@router.post("/{stream_id}/close")
async def close(request: Request, stream_id: str) -> Response:
    try:
        data, total = await _streams(request).close(_checked_id(stream_id))
    except RenderRequestError as e:
        raise _fail(e) from e
    return Response(data, media_type=_FMP4, headers={FRAMES: str(total)})


@router.delete("/{stream_id}")
async def abort(request: Request, stream_id: str) -> dict[str, str]:
    if not _streams(request).abort(_checked_id(stream_id)):
        raise HTTPException(404, f"no render stream {stream_id[:40]!r}")
    return {"aborted": stream_id}


@router.get("/idle")
async def idle(request: Request, avatar: str = Query(..., min_length=1, max_length=64)) -> Response:
    media: AvatarMedia = request.app.state.media
    try:
        data = await media.idle_clip(avatar)
    except UnknownAvatarError as e:
        raise HTTPException(404, f"no avatar named {avatar!r}") from e
    return Response(data, media_type="video/mp4")


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    return _streams(request).status()
