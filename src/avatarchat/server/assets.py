"""The built web app's files (web/, mounted at /app): hashed assets cached for good, JS/CSS sent gzipped.

The build writes a ``.gz`` twin next to each JS/CSS file (web/vite.config.ts, ``precompress``), so serving
one costs no CPU: a client that accepts gzip gets the twin with ``Content-Encoding: gzip``, any other the
plain file. Only these files are compressed; the rest of the app (WebSocket, fMP4 streams, API) is untouched.
"""

from __future__ import annotations

import stat
from mimetypes import guess_type

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Scope

ASSETS = "assets/"  # Vite's output for hashed files: a changed file gets a new name
COMPRESSED = (".js", ".css")
IMMUTABLE = "public, max-age=31536000, immutable"


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (RFC 9110 12.5.3: ``q=0`` refuses; ``*`` is any other)."""
    star = False
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        name = name.strip().lower()
        if name in ("gzip", "x-gzip"):
            return q > 0
        if name == "*":
            star = q > 0
    return star


class WebAppFiles(StaticFiles):
    """StaticFiles for the web app build: precompressed JS/CSS, and cache headers by kind of file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        headers = Headers(scope=scope)
        compressible = path.endswith(COMPRESSED)
        response: Response | None = None
        if compressible and scope["method"] in ("GET", "HEAD") and accepts_gzip(headers.get("accept-encoding", "")):
            # lookup_path keeps the twin inside the directory, as for any file (in a thread: it stats).
            full, st = await anyio.to_thread.run_sync(self.lookup_path, path + ".gz")
            if st is not None and stat.S_ISREG(st.st_mode):
                response = FileResponse(full, stat_result=st, media_type=guess_type(path)[0],
                                        headers={"Content-Encoding": "gzip"})
                if self.is_not_modified(response.headers, headers):
                    response = NotModifiedResponse(response.headers)
        if response is None:
            response = await super().get_response(path, scope)  # 404, 405, traversal: as StaticFiles
        response.headers["Cache-Control"] = IMMUTABLE if path.startswith(ASSETS) else "no-cache"
        if compressible:
            response.headers["Vary"] = "Accept-Encoding"
        return response
