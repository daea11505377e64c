"""The avatar service API, at seed 000's paths: list, preview, add, delete, start, and the TTS voices."""

from __future__ import annotations

import asyncio
from typing import Any

import cv2
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.engines.registry import TTS_ENGINES, Engines
from avatarchat.services.avatar_store import AvatarStore, AvatarStoreError, check_name

router = APIRouter(prefix="/api")
_CHUNK = 1 << 16


class NameBody(BaseModel):
    name: str


def _engines(request: Request) -> Engines:
    return request.app.state.engines  # type: ignore[no-any-return]


def _store(request: Request) -> AvatarStore:
    return request.app.state.avatar_store  # type: ignore[no-any-return]


def _fail(e: AvatarStoreError) -> HTTPException:
    return HTTPException(e.status, str(e))


@router.get("/avatar/list")
async def list_avatars(request: Request) -> dict[str, Any]:
    return {"avatars": [a.as_dict() for a in _store(request).list()]}


@router.get("/avatar/preview")
async def preview(request: Request, name: str = Query(...), size: int = Query(256, ge=32, le=512)) -> Response:
    engines, store = _engines(request), _store(request)
    try:
        check_name(name)
    except AvatarStoreError as e:
        raise _fail(e) from e
    if not store.exists(name):
        raise HTTPException(404, f"no avatar named {name!r}")

    def thumbnail() -> bytes:
        frame = engines.avatars.poster(name)
        small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        ok, png = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return png.tobytes()

    try:
        data = await asyncio.get_running_loop().run_in_executor(engines.workers, thumbnail)
    except UnknownAvatarError as e:
        raise HTTPException(404, f"no avatar named {name!r}") from e
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.post("/avatar/add", status_code=201)
async def add(request: Request, name: str = Form(...), file: UploadFile = File(...)) -> dict[str, Any]:
    store, engines = _store(request), _engines(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > store.max_upload_bytes + 64 * 1024:
        raise HTTPException(413, f"upload is over the {store.max_upload_bytes}-byte limit")
    data = bytearray()
    while chunk := await file.read(_CHUNK):
        data += chunk
        if len(data) > store.max_upload_bytes:
            raise HTTPException(413, f"upload is over the {store.max_upload_bytes}-byte limit")
    try:
        info = await asyncio.get_running_loop().run_in_executor(
            engines.workers, store.add, name, bytes(data), file.filename or "upload"
        )
    except AvatarStoreError as e:
        raise _fail(e) from e
    return info.as_dict()


@router.post("/avatar/delete")
async def delete(request: Request, body: NameBody) -> dict[str, Any]:
    store, engines = _store(request), _engines(request)
    if any(s.avatar == body.name for s in request.app.state.sessions.sessions()):
        raise HTTPException(409, f"avatar {body.name!r} is in use by a session")
    try:
        await asyncio.get_running_loop().run_in_executor(None, store.delete, body.name)
    except AvatarStoreError as e:
        raise _fail(e) from e
    engines.avatars.forget(body.name)
    request.app.state.idle.forget(body.name)
    return {"deleted": body.name}


@router.post("/avatar/start")
async def start(request: Request, body: NameBody) -> dict[str, Any]:
    """Preload an avatar's renderer, so the session that uses it starts at once."""
    engines, store = _engines(request), _store(request)
    try:
        check_name(body.name)
    except AvatarStoreError as e:
        raise _fail(e) from e
    if not store.exists(body.name):
        raise HTTPException(404, f"no avatar named {body.name!r}")
    renderer = await asyncio.get_running_loop().run_in_executor(engines.workers, engines.avatars.renderer, body.name)
    width, height = renderer.size
    return {"name": body.name, "ready": True, "width": width, "height": height, "fps": engines.settings.avatar.fps}


@router.get("/tts/models")
async def tts_models(request: Request) -> dict[str, Any]:
    engines = _engines(request)
    s = engines.settings.tts
    return {
        "engine": s.engine,
        "engines": sorted(TTS_ENGINES),
        "voices": engines.tts.voices(),
        "rate": s.rate,
    }
