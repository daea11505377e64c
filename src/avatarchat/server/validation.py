"""Request validation errors (422) that can always be written as JSON."""

from __future__ import annotations

import math

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse


def _json_safe(value: object) -> object:
    """Non-finite floats as strings: a body may hold the NaN and Infinity literals (Python's JSON reads them),
    an error echoes them back, and strict JSON has no such numbers (the response failed: a 500)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


async def validation_error(_request: Request, e: Exception) -> JSONResponse:
    """FastAPI's own 422 answer, with the errors made JSON-safe."""
    assert isinstance(e, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(e.errors()))}, status_code=422)
