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
    with pytest.raises(LLMError, match="no content within 0.3 s"):
        await collect(e)
    await e.close()


@pytest.mark.parametrize("data", ["5", "[1, 2]", '{"choices": [5]}', '{"choices": [{"delta": "x"}]}',
                                  '{"choices": {"a": 1}}', '{"choices": [{"delta": {"content": 7}}]}', "1" * 5000])
async def test_a_chunk_of_another_shape_is_a_clear_error(upstream: OpenAITestServer, data: str) -> None:
    """Well-formed JSON that is not a chat-completion delta (or an integer too long to parse): LLMError, not TypeError."""
    upstream.behaviour.raw_data = ['{"choices": [{"delta": {"content": "Hi "}}]}', data]
    e = engine(upstream)
    with pytest.raises(LLMError, match="not a chat-completion delta|invalid JSON"):
        await collect(e)
    await e.close()


async def test_chunks_without_content_are_skipped(upstream: OpenAITestServer) -> None:
    upstream.behaviour.raw_data = ['{"choices": []}', '{"usage": {"total_tokens": 3}}', '{"choices": [{"delta": {}}]}',
                                   '{"choices": [{"delta": {"content": null}}]}', '{"choices": [{"delta": {"content": "ok"}}]}']
    e = engine(upstream)
    assert await collect(e) == "ok"
    await e.close()


async def test_keep_alive_comments_do_not_count_as_the_first_token(upstream: OpenAITestServer) -> None:
    upstream.behaviour.keepalive_forever = True
    e = engine(upstream, first_token_timeout_s=0.5)
    t = asyncio.get_running_loop().time()
    with pytest.raises(LLMError, match="no content within 0.5 s"):
        await asyncio.wait_for(collect(e), 10)
    assert asyncio.get_running_loop().time() - t < 5
    await e.close()


async def test_the_first_token_deadline_counts_from_the_request(upstream: OpenAITestServer) -> None:
    """Slow response headers and then a slow first token: together past the deadline, each alone within it."""
    upstream.behaviour.headers_delay_s = 0.4
    upstream.behaviour.first_token_delay_s = 0.4
    e = engine(upstream, first_token_timeout_s=0.6, read_timeout_s=5)
    with pytest.raises(LLMError, match="no content within 0.6 s"):
        await collect(e)
    await e.close()


async def test_a_reply_that_never_ends_is_cut_at_the_reply_timeout(upstream: OpenAITestServer) -> None:
    upstream.behaviour.reply = " ".join(["word"] * 10_000)
    upstream.behaviour.token_delay_s = 0.01
    e = engine(upstream, reply_timeout_s=0.8)
    got: list[str] = []
    with pytest.raises(LLMError, match="did not end within 0.8 s"):
        async for d in e.stream(MSGS, max_tokens=20, temperature=0.1):
            got.append(d)
    assert got  # content came, then the overall deadline ended it
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
