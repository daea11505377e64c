"""The slow upstream: an avatar service whose /api/avatar/list takes DELAY seconds (default 3).

    python bench/forwarding/upstream.py PORT [DELAY]
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

DELAY = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
BODY = {"avatars": [{"name": "default", "builtin": True, "created": 0.0, "width": 512, "height": 512,
                     "source": "builtin"}]}


async def avatars(request: Request) -> JSONResponse:
    await asyncio.sleep(DELAY)
    return JSONResponse(BODY)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/api/avatar/list", avatars), Route("/health", health)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", backlog=4096,
                timeout_keep_alive=60)
