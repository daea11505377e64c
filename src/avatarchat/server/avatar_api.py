"""The avatar service API, at seed 000's paths: list, preview, add, delete, start, the TTS voices and the
WebRTC signalling proxy. The work is done by ``app.state.avatar_service``: in-process when co-located,
over pooled HTTP from a gateway (services/avatar_client.py)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from avatarchat.services.avatar_client import AvatarService, AvatarServiceError
from avatarchat.services.webrtc import WebRTCError, check_offer, resolve

router = APIRouter(prefix="/api")
_CHUNK = 1 << 16


class NameBody(BaseModel):
    name: str


def _service(request: Request) -> AvatarService:
    return request.app.state.avatar_service  # type: ignore[no-any-return]


async def service_error(_request: Request, e: Exception) -> JSONResponse:
    """The app's handler for AvatarServiceError and WebRTCError: their status and message, as HTTPException would."""
    assert isinstance(e, (AvatarServiceError, WebRTCError))
    return JSONResponse({"detail": str(e)}, status_code=e.status)


@router.get("/avatar/list")
async def list_avatars(request: Request) -> dict[str, Any]:
    return await _service(request).list()


@router.get("/avatar/preview")
async def preview(request: Request, name: str = Query(...), size: int = Query(256, ge=32, le=512)) -> Response:
    data = await _service(request).preview(name, size)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.post("/avatar/add", status_code=201)
async def add(request: Request, name: str = Form(...), file: UploadFile = File(...)) -> dict[str, Any]:
    limit = request.app.state.settings.avatar.largest_upload  # the store checks each kind's own limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise HTTPException(413, f"upload is over the {limit}-byte limit")
    data = bytearray()
    while chunk := await file.read(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, f"upload is over the {limit}-byte limit")
    return await _service(request).add(name, bytes(data), file.filename or "upload")


@router.post("/avatar/delete")
async def delete(request: Request, body: NameBody) -> dict[str, Any]:
    if any(s.avatar == body.name for s in request.app.state.sessions.sessions()):
        raise HTTPException(409, f"avatar {body.name!r} is in use by a session")
    result = await _service(request).delete(body.name)
    # This process's own renderers (its sessions) must not outlive the avatar either.
    if (engines := getattr(request.app.state, "engines", None)) is not None:
        engines.avatars.forget(body.name)
    if (idle := getattr(request.app.state, "idle", None)) is not None:
        idle.forget(body.name)
    if (media := getattr(request.app.state, "media", None)) is not None:
        media.forget(body.name)  # a gateway's cached size and idle clip of it
    return result


@router.post("/avatar/start")
async def start(request: Request, body: NameBody) -> dict[str, Any]:
    """Preload an avatar's renderer, so the session that uses it starts at once."""
    return await _service(request).start(body.name)


@router.get("/tts/models")
async def tts_models(request: Request) -> dict[str, Any]:
    return await _service(request).tts_models()


async def webrtc(request: Request, path: str) -> dict[str, Any]:
    """Signalling: only the avatar service's known routes pass (services/webrtc.py's allow-list)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    route = resolve(request.method, raw.decode("latin-1"))
    service = _service(request)
    if route.kind == "close":
        assert route.peer_id is not None
        return await service.webrtc_close(route.peer_id)
    body = await request.body()
    if len(body) > 128 * 1024:
        raise WebRTCError(413, "signalling body is over 128 KiB")
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise WebRTCError(400, "the body must be JSON") from e
    return await service.webrtc_offer(check_offer(parsed))


# One route per method: one api_route with five methods gave the schema five operations with one operationId.
for _method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
    router.add_api_route("/webrtc/{path:path}", webrtc, methods=[_method], operation_id=f"webrtc_{_method.lower()}")
