"""Variant (b): seed 000's fix, Flask async views with httpx.

Flask runs each async view on an event loop of its own (asgiref), so an AsyncClient cannot be shared
between requests (its pool is bound to one loop): a client per request, as Flask's docs imply.
"""

from __future__ import annotations

import os

import httpx
from flask import Flask, jsonify

UPSTREAM = os.environ["UPSTREAM"]
app = Flask(__name__)


@app.get("/api/avatar/list")
async def avatars():  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(UPSTREAM + "/api/avatar/list")
    return jsonify(r.json())
