"""The FastAPI application: page, WebSocket sessions, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from avatarchat import __version__
from avatarchat.config import Settings
from avatarchat.engines.avatar.library import UnknownAvatarError
from avatarchat.engines.registry import Engines
from avatarchat.metrics import REGISTRY
from avatarchat.pipeline.session import SessionManager
from avatarchat.server.avatar_api import router as avatar_router
from avatarchat.server.idle import IdleClips
from avatarchat.server.monitor import router as monitor_router
from avatarchat.services.avatar_store import AvatarStore
from avatarchat.server.ws import router as ws_router

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
WEBAPP = Path(__file__).parent / "webapp"  # the built web app (web/, `npm run build`); not in git


def create_app(settings: Settings, engines: Engines | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engines or Engines(settings)
        app.state.engines = eng
        app.state.sessions = SessionManager(settings.session)
        app.state.idle = IdleClips(eng)
        app.state.avatar_store = AvatarStore(
            settings.avatar.dir,
            max_upload_bytes=settings.avatar.max_upload_bytes,
            max_pixels=settings.avatar.max_upload_pixels,
        )
        # Load in the background: /health answers at once, /ready once the models are warm.
        loader = asyncio.create_task(_load(eng, app.state.idle))
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await app.state.sessions.close_all()
            await eng.close()
            app.state.avatar_store.close()

    app = FastAPI(title="Avatar Chat", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.include_router(ws_router)
    app.include_router(avatar_router)
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
    app.mount("/app", StaticFiles(directory=WEBAPP, check_dir=False), name="webapp")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        eng: Engines = app.state.engines
        body = {
            "ready": eng.ready.is_set(),
            "llm": eng.settings.llm.engine,
            "tts": eng.settings.tts.engine,
            "sessions": len(app.state.sessions),
            "load_seconds": eng.load_seconds,
        }
        if eng.load_error:
            body["error"] = eng.load_error
        return JSONResponse(body, status_code=200 if eng.ready.is_set() else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/avatars")
    async def avatars() -> dict[str, object]:
        eng: Engines = app.state.engines
        return {"default": settings.avatar.default, "avatars": eng.avatars.names()}

    @app.get("/avatars/{name}/idle.mp4")
    async def idle_clip(name: str) -> Response:
        eng: Engines = app.state.engines
        if name not in eng.avatars.names():
            raise HTTPException(404, f"no avatar named {name!r}")
        try:
            data = await app.state.idle.get(name)
        except UnknownAvatarError as e:
            raise HTTPException(404, f"no avatar named {name!r}") from e
        return Response(data, media_type="video/mp4", headers={"Cache-Control": "public, max-age=3600"})

    return app


async def _load(engines: Engines, idle: IdleClips) -> None:
    try:
        await engines.start(then=lambda: idle.get(engines.settings.avatar.default))
    except Exception:
        log.exception("start-up failed; /ready stays 503")
