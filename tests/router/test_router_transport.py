"""The lean httptools transport under the router's httpx client: keep-alive reuse, streaming, errors."""

from __future__ import annotations

import httpx
import pytest

from avatarchat.router.transport import LeanTransport
from tests.support.openai_server import OpenAITestServer


async def test_reuses_connections_and_streams(ups: list[OpenAITestServer]) -> None:
    t = LeanTransport()
    async with httpx.AsyncClient(transport=t, timeout=5) as c:
        for _ in range(3):
            r = await c.get(ups[0].base_url + "/models")
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "test-model"
        assert sum(len(v) for v in t._idle.values()) == 1  # one connection, reused
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with c.stream("POST", ups[0].base_url + "/chat/completions", json=body) as r:
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
        assert raw.endswith(b"data: [DONE]\n\n") and b"answer" in raw
        r = await c.post(ups[0].base_url + "/chat/completions", json={**body, "stream": False})
        assert r.json()["choices"][0]["message"]["content"] == "answer from a ."


async def test_errors_are_httpx_errors(ups: list[OpenAITestServer]) -> None:
    async with httpx.AsyncClient(transport=LeanTransport(), timeout=httpx.Timeout(5, read=0.3)) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("http://127.0.0.1:9/v1/models")
        ups[0].behaviour.drop_after_tokens = 1
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("POST", ups[0].base_url + "/chat/completions", json=body) as r:
                [chunk async for chunk in r.aiter_raw()]
        ups[0].behaviour.drop_after_tokens, ups[0].behaviour.first_token_delay_s = None, 2
        with pytest.raises(httpx.ReadTimeout):
            async with c.stream("POST", ups[0].base_url + "/chat/completions", json=body) as r:
                [chunk async for chunk in r.aiter_raw()]
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.get("ftp://127.0.0.1/x")
