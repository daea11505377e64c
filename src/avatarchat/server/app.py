"""The FastAPI application: page, WebSocket sessions, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from avatarchat import __version__
from avatarchat.config import Settings
from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.engines.registry import PARTS, TTS_ENGINES, Engines
from avatarchat.metrics import REGISTRY
from avatarchat.pipeline.avatar_media import AvatarMedia, LocalAvatarMedia, MediaError
from avatarchat.pipeline.session import SessionManager
from avatarchat.server.assets import WebAppFiles
from avatarchat.server.avatar_api import router as avatar_router, service_error
from avatarchat.pipeline.capacity import calibrate_capacity
from avatarchat.server.idle import IdleClips
from avatarchat.server.llm_api import router as llm_router
from avatarchat.server.monitor import router as monitor_router
from avatarchat.server.access import AccessMiddleware
from avatarchat.server.body_limit import BodyLimitMiddleware, upload_limits
from avatarchat.services.render_wire import max_body
from avatarchat.server.relay import RelayMiddleware
from avatarchat.server.render_api import router as render_router
from avatarchat.server.service_auth import ServiceTokenMiddleware
from avatarchat.server.validation import validation_error
from avatarchat.server.ws import router as ws_router
from avatarchat.services.avatar_client import AvatarService, AvatarServiceError, HttpAvatarService, LocalAvatarService
from avatarchat.services.avatar_store import AvatarStore, clip_limits
from avatarchat.services.llm_exec import LLMExecutor
from avatarchat.services.render_client import RemoteAvatarMedia
from avatarchat.services.render_streams import RenderStreams
from avatarchat.services.webrtc import WebRTCError

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
WEBAPP = Path(__file__).parent / "webapp"  # the built web app (web/, `npm run build`); not in git


def create_app(settings: Settings, engines: Engines | None = None, config_path: str | Path | None = None) -> FastAPI:
    role = settings.services.role

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engines or Engines(settings)
        app.state.engines = eng
        app.state.idle = IdleClips(eng)
        app.state.llm_exec = LLMExecutor(settings.llm.openai, settings.services.llm,
                                         max_tokens=settings.llm.max_tokens, temperature=settings.llm.temperature)
        app.state.llm_exec.attach(asyncio.get_running_loop())
        store: AvatarStore | None = None
        render: RenderStreams | None = None
        service: AvatarService
        media: AvatarMedia
        if role == "gateway":
            service = HttpAvatarService(settings.services.avatar, token=settings.services.token.get_secret_value())
            # The avatar service renders this gateway's turns, over the same pooled client.
            media = RemoteAvatarMedia(service.client, settings.services.render, settings.avatar.fps)
            # A gateway renders nothing: no avatar renderer (mediapipe) and no idle clip to warm up.
            parts, warm = tuple(p for p in PARTS if p != "avatar"), None
        else:
            store = AvatarStore(
                settings.avatar.dir,
                max_upload_bytes=settings.avatar.max_upload_bytes,
                max_pixels=settings.avatar.max_upload_pixels,
                max_avatars=settings.avatar.max_avatars,
                clip=clip_limits(settings.avatar.clip),
                max_clip_bytes=settings.avatar.clip.max_bytes,
                fps=settings.avatar.fps,
            )
            service = LocalAvatarService(store, eng.avatars, eng.cpu.background, settings.avatar.fps,
                                         lambda: _tts_info(eng), settings.services.webrtc_max_peers)
            local = LocalAvatarMedia(eng.avatars, eng.cpu, settings, app.state.idle, eng.capacity)
            media, parts, warm = local, PARTS, app.state.idle
            if role == "avatar":  # it needs only its renderer (no LLM, VAD or ASR), and renders for gateways
                render = app.state.render = RenderStreams(local, settings.services.render, settings.avatar.fps)
                parts = ("avatar",)
        app.state.media = media
        app.state.sessions = SessionManager(settings.session, media, eng.capacity)
        # Kept whatever the renderer cache's bound: the default avatar (new sessions') and the avatars in use.
        eng.avatars.in_use = lambda: [settings.avatar.default, *(s.avatar for s in app.state.sessions.sessions()),
                                      *(render.avatars() if render is not None else ())]
        app.state.avatar_store = store
        app.state.avatar_service = service
        # Load in the background: /health answers at once, /ready once the models are warm.
        loader = asyncio.create_task(_load(eng, warm, parts))
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await app.state.sessions.close_all()
            if render is not None:
                render.close_all()
            await media.close()
            await service.close()
            await app.state.llm_exec.aclose()
            await eng.close()
            if store is not None:
                store.close()

    # Metrics are ours (Prometheus, /metrics); FastAPI's OpenTelemetry hooks would look for providers per request.
    app = FastAPI(title="Avatar Chat", version=__version__, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    app.state.config_path = config_path
    if role != "avatar":  # sessions (and the models they need) live on the gateway
        app.include_router(ws_router)
        app.include_router(llm_router)
    if role == "gateway":
        app.add_middleware(RelayMiddleware)
    if role == "avatar":  # gateways have their turns rendered here (server/render_api.py): internal, not public
        app.include_router(render_router)
        if token := settings.services.token.get_secret_value():
            app.add_middleware(ServiceTokenMiddleware, token=token)
    app.include_router(avatar_router)
    render = settings.services.render
    app.add_middleware(BodyLimitMiddleware,  # render batches have their own, checked limit (render_api.py)
                       default=max(settings.server.max_body_bytes, max_body(render.max_batch_frames, render.max_batch_samples)),
                       per_path=upload_limits(settings.avatar.largest_upload))
    app.add_middleware(AccessMiddleware, config=settings.server)  # outermost: refused before any work
    app.add_exception_handler(AvatarServiceError, service_error)
    app.add_exception_handler(WebRTCError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    if settings.llm.engine == "router" and settings.llm.router.mount_api:
        from avatarchat.router.app import router_routes

        # The router's OpenAI-compatible API on this port, served by the same in-process router.
        app.router.routes.extend(
            router_routes(lambda: getattr(app.state.engines.llm, "router", None) if hasattr(app.state, "engines") else None,
                          admin_prefix="/router/admin")
        )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        """The web app when it is built, else the plain page."""
        page = WEBAPP / "index.html"
        return FileResponse(page if page.is_file() else STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/basic", include_in_schema=False)
    async def basic() -> FileResponse:
        """The plain page (no build step): a fallback and a reference client."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(monitor_router)
    # Hashed assets cached for a year and sent as their precompressed .gz (server/assets.py).
    app.mount("/app", WebAppFiles(directory=WEBAPP, check_dir=False), name="webapp")

    @app.get("/health")
    async def health() -> dict[str, object]:
        body: dict[str, object] = {"status": "ok", "version": __version__, "role": role}
        if (llm := getattr(app.state, "llm_exec", None)) is not None and role != "avatar":
            body["llm_exec"] = llm.status()
        return body

    @app.get("/ready")
    async def ready() -> JSONResponse:
        eng: Engines = app.state.engines
        body: dict[str, object] = {
            "ready": eng.ready.is_set(),
            "llm": eng.settings.llm.engine,
            "tts": eng.settings.tts.engine,
            "sessions": len(app.state.sessions),
            "load_seconds": eng.load_seconds,
        }
        if eng.load_error:
            body["error"] = eng.load_error
        body["role"] = role
        body["dependencies"] = deps = await _dependencies(app)
        # Queue mode needs Redis and a live Celery worker (each says so with "required").
        missing = [f"{name}: {d.get('error', 'not ok')}" for name, d in deps.items()
                   if isinstance(d, dict) and d.get("required") and not d.get("ok")]
        if missing:
            body["ready"] = False
            body["not_ready"] = missing
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/avatars")
    async def avatars() -> dict[str, object]:
        media: AvatarMedia = app.state.media
        try:
            names = await media.list_names()
        except MediaError as e:
            raise HTTPException(502, str(e)) from e
        return {"default": settings.avatar.default, "avatars": names}

    @app.get("/avatars/{name}/idle.mp4")
    async def idle_clip(name: str) -> Response:
        try:
            data = await app.state.media.idle_clip(name)
        except UnknownAvatarError as e:
            raise HTTPException(404, f"no avatar named {name!r}") from e
        except MediaError as e:
            raise HTTPException(503 if e.status == 503 else 502, str(e)) from e
        return Response(data, media_type="video/mp4", headers={"Cache-Control": "public, max-age=3600"})

    return app


def _tts_info(engines: Engines) -> dict[str, object]:
    s = engines.settings.tts
    return {"engine": s.engine, "engines": sorted(TTS_ENGINES), "voices": engines.tts.voices(), "rate": s.rate}


async def _dependencies(app: FastAPI) -> dict[str, object]:
    """Each dependency's state: the avatar service, and on a gateway the LLM channels and Redis."""
    role = app.state.settings.services.role
    eng: Engines = app.state.engines
    service: AvatarService = app.state.avatar_service
    if role == "avatar":
        return {"avatar_service": await service.health()}
    avatar, remote = await asyncio.gather(service.health(), app.state.llm_exec.dependencies())
    # "exec" is the /api/llm endpoints' path (execution modes) to llm.openai: its channel is probed even
    # when the sessions' engine is local, and is reported there, apart from the engine's own state.
    llm: dict[str, object] = {"engine": eng.settings.llm.engine, "ok": eng.ready.is_set() and not eng.load_error,
                              "exec": {**app.state.llm_exec.status(), "channel": remote["llm_channel"]}}
    if (channels := router_channels(getattr(eng, "llm", None))) is not None:
        llm["channels"] = channels
    return {"avatar_service": avatar, "llm": llm, "redis": remote["redis"], "queue_worker": remote["queue_worker"]}


def router_channels(llm: object) -> list[dict[str, object]] | None:
    """With ``llm.engine: router``, each channel's breaker state, for readiness; else None."""
    router = getattr(llm, "router", None)
    if router is None:
        return None
    keys = ("name", "state", "available", "unavailable_reason", "last_error")
    return [{k: c[k] for k in keys} for c in router.channels()]


async def _load(engines: Engines, idle: IdleClips | None, parts: tuple[str, ...] = PARTS) -> None:
    async def warm() -> None:
        if idle is not None:
            await idle.get(engines.settings.avatar.default)
        if "tts" in parts:  # a process with sessions: the cost of one speaking, for admission (pipeline/capacity.py)
            await calibrate_capacity(engines, render=idle is not None)

    try:
        await engines.start(then=warm, parts=parts)
    except Exception:
        log.exception("start-up failed; /ready stays 503")
        return
    # What start-up loaded lives as long as the process: the cyclic GC need not walk it again on every
    # full collection (one took ~120 ms in the middle of a burst of 1000 requests, bench/forwarding).
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen for the GC: %d", gc.get_freeze_count())
