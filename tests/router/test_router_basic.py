from __future__ import annotations

import json

from tests.support.openai_server import OpenAITestServer


async def test_exact_model_non_stream(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    r = await live.chat("gpt-4o")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "answer from b ."
    assert r.headers["x-router-channel"] == "b"
    assert ups[1].requests[-1]["body"]["model"] == "gpt-4o"


async def test_stream_is_byte_correct_sse(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    async with live.client.stream("POST", "/v1/chat/completions", json={"model": "llama-3-70b", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([c async for c in r.aiter_raw()])
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")[:-1]
    assert all(f.startswith(b"data: ") for f in frames)
    text = ""
    for f in frames[:-1]:
        delta = json.loads(f[6:])["choices"][0]["delta"]
        text += delta.get("content") or ""
    assert text == "answer from c ."
