import asyncio

import pytest

from avatarchat.config import OpenAIConfig
from avatarchat.engines.llm.base import LLMError
from avatarchat.engines.llm.openai_compat import OpenAIEngine
from tests.support.openai_server import OpenAITestServer

MSGS = [{"role": "user", "content": "hi"}]


def engine(server: OpenAITestServer, **kw: object) -> OpenAIEngine:
    return OpenAIEngine(OpenAIConfig(base_url=server.base_url, model="test-model", api_key="k1", **kw))


async def collect(e: OpenAIEngine) -> str:
    return "".join([d async for d in e.stream(MSGS, max_tokens=20, temperature=0.1)])


async def test_streams_deltas_and_sends_the_request(upstream: OpenAITestServer) -> None:
    e = engine(upstream)
    try:
        assert await collect(e) == upstream.behaviour.reply
    finally:
        await e.close()
    req = upstream.requests[-1]
    assert req["body"]["stream"] is True and req["body"]["model"] == "test-model"
    assert req["body"]["messages"] == MSGS and req["body"]["max_tokens"] == 20
    assert req["headers"]["authorization"] == "Bearer k1"


async def test_http_error_is_reported(upstream: OpenAITestServer) -> None:
    upstream.behaviour.status = 503
    e = engine(upstream)
    with pytest.raises(LLMError, match="503"):
        await collect(e)
    await e.close()


async def test_error_frame_in_stream(upstream: OpenAITestServer) -> None:
    upstream.behaviour.error_frame = "model overloaded"
    e = engine(upstream)
    with pytest.raises(LLMError, match="model overloaded"):
        await collect(e)
    await e.close()


async def test_first_token_timeout(upstream: OpenAITestServer) -> None:
    upstream.behaviour.first_token_delay_s = 2.0
    e = engine(upstream, first_token_timeout_s=0.3)
    with pytest.raises(LLMError, match="within 0.3 s"):
        await collect(e)
    await e.close()


async def test_mid_stream_drop_is_an_error(upstream: OpenAITestServer) -> None:
    upstream.behaviour.drop_after_tokens = 2
    e = engine(upstream)
    with pytest.raises(LLMError):
        await collect(e)
    await e.close()


async def test_unreachable_server() -> None:
    e = OpenAIEngine(OpenAIConfig(base_url="http://127.0.0.1:9/v1", connect_timeout_s=0.5))
    with pytest.raises(LLMError, match="unreachable"):
        await collect(e)
    await e.close()


async def test_closing_the_stream_cancels(upstream: OpenAITestServer) -> None:
    upstream.behaviour.token_delay_s = 0.05
    e = engine(upstream)
    got = []
    stream = e.stream(MSGS, max_tokens=20, temperature=0.1)
    async for d in stream:
        got.append(d)
        if len(got) == 2:
            break
    await stream.aclose()
    assert len(got) == 2
    await asyncio.wait_for(e.close(), 2)


async def test_replies_stream_in_parallel_up_to_the_configured_limit(upstream: OpenAITestServer) -> None:
    """Sessions do not wait for each other's replies; beyond max_concurrent they wait for a connection."""
    upstream.behaviour.reply = "one two three four five six"
    upstream.behaviour.token_delay_s = 0.05
    for limit, sessions in ((8, 6), (2, 6)):
        upstream.peak_in_flight = 0
        engine = OpenAIEngine(OpenAIConfig(base_url=upstream.base_url, model="m", max_concurrent=limit))

        async def reply() -> str:
            return "".join([d async for d in engine.stream(MSGS, max_tokens=20, temperature=0.5)])

        texts = await asyncio.gather(*(reply() for _ in range(sessions)))
        await engine.close()
        assert texts == ["one two three four five six"] * sessions
        assert upstream.peak_in_flight == min(limit, sessions)
