"""Variant (a), the baseline: seed 000's original, Flask + requests (blocking), under Gunicorn sync workers."""

from __future__ import annotations

import os

import requests
from flask import Flask, jsonify

UPSTREAM = os.environ["UPSTREAM"]
app = Flask(__name__)


@app.get("/api/avatar/list")
def avatars():  # type: ignore[no-untyped-def]
    r = requests.get(UPSTREAM + "/api/avatar/list", timeout=30)
    return jsonify(r.json())
