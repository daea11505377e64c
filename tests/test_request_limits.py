"""Issue 14's low items on what a client may send: non-finite numbers."""

from __future__ import annotations

import httpx
import pytest

from tests.support.live_app import LiveApp

CHAT = '{"messages": [{"role": "user", "content": "hi"}], %s}'


@pytest.mark.parametrize("field", ['"temperature": NaN', '"temperature": Infinity', '"temperature": -Infinity',
                                   '"max_tokens": NaN'])
def test_non_finite_numbers_are_a_422_with_a_message(live_app: LiveApp, field: str) -> None:
    """Python's JSON reads the NaN and Infinity literals; the validation error echoing them back was a 500."""
    for path in ("/api/llm/chat", "/api/llm/tasks"):
        r = httpx.post(live_app.http + path, content=CHAT % field, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"][-1] == field.split('"')[1] and detail["msg"], detail
    r = httpx.post(live_app.http + "/api/llm/chat", content=CHAT % '"temperature": NaN',
                   headers={"content-type": "application/json"})
    assert "finite number" in r.json()["detail"][0]["msg"]
