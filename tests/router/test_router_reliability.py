"""Retries, Retry-After, failover before and after the first token, cooldown, auth failures."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.router.conftest import base_config
from tests.support.models_server import BigModelsServer
from tests.support.openai_server import OpenAITestServer


@pytest.fixture
def big_models() -> Iterator[BigModelsServer]:
    server = BigModelsServer().start()
    yield server
    server.stop()


def sse_text(raw: bytes) -> tuple[str, list[dict]]:
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]", raw[-200:]
    text, objs = "", []
    for f in frames[:-2]:
        assert f.startswith(b"data: "), f
        obj = json.loads(f[6:])
        objs.append(obj)
        for c in obj.get("choices") or ():
            text += (c.get("delta") or {}).get("content") or ""
    return text, objs


async def stream_raw(live, model: str) -> tuple[int, bytes, dict]:
    async with live.client.stream("POST", "/v1/chat/completions",
                                  json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        return r.status_code, b"".join([c async for c in r.aiter_raw()]), dict(r.headers)


async def test_retries_same_channel_on_5xx(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[1].behaviour.fail_first = 1
    r = await live.chat("gpt-4o")
    assert r.status_code == 200 and r.headers["x-router-attempts"] == "2"
    assert len(ups[1].requests) == 2


async def test_retry_after_is_honoured(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[1].behaviour.fail_first, ups[1].behaviour.fail_status, ups[1].behaviour.retry_after = 1, 429, "0.4"
    t0 = time.monotonic()
    r = await live.chat("gpt-4o")
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.4
    assert len(ups[1].requests) == 2


async def test_long_retry_after_cools_down_and_fails_over(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.status, ups[0].behaviour.retry_after = 429, "30"
    t0 = time.monotonic()
    r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.status_code == 200 and r.headers["x-router-channel"] != "a" and time.monotonic() - t0 < 1.0
    ch = {c["name"]: c for c in (await live.client.get("/admin/channels", headers=live.admin)).json()["channels"]}
    assert ch["a"]["state"] == "open" and 28 < ch["a"]["cooldown_remaining_s"] <= 30
    assert ch["a"]["last_status"] == 429


async def test_all_rate_limited_gives_429(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[1].behaviour.status, ups[1].behaviour.retry_after = 429, "9"
    r = await live.chat("gpt-4o")
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    r = await live.chat("gpt-4o")  # now cooling down: 503 with the reason and when to retry
    assert r.status_code == 503 and "cooling down" in r.json()["error"]["message"]
    assert 7 <= int(r.headers["retry-after"]) <= 9


async def test_failover_on_connect_error(live_router, ups: list[OpenAITestServer]) -> None:
    cfg = base_config(ups)
    cfg["providers"]["a"]["base_url"] = "http://127.0.0.1:9/v1"  # nothing listens there
    live = await live_router(cfg)
    r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.status_code == 200 and r.headers["x-router-channel"] != "a"
    assert r.headers["x-router-attempts"] == "3"  # a, a again (retry with backoff), then the next channel
    assert "connect" in live.router.health["a"].last_error


async def test_failover_when_stream_stalls_before_first_token(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.first_token_delay_s = 5  # over ttft_timeout_s (1 s)
    t0 = time.monotonic()
    status, raw, headers = await stream_raw(live, "shared-model")
    assert status == 200 and headers["x-router-channel"] != "a"
    assert 1.0 <= time.monotonic() - t0 < 3
    text, _ = sse_text(raw)
    assert text in ("answer from b .", "answer from c .")


async def test_failover_when_stream_drops_before_first_token(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.drop_after_tokens = 0
    status, raw, headers = await stream_raw(live, "tag:shared,!premium")
    assert status == 200 and headers["x-router-channel"] == "c"
    text, objs = sse_text(raw)
    assert text == "answer from c ."
    assert sum(1 for o in objs if (o["choices"][0]["delta"] or {}).get("role")) == 1  # one role chunk: not spliced


async def test_error_frame_before_first_token_fails_over(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.error_frame = "model overloaded"
    status, raw, headers = await stream_raw(live, "shared-model")
    assert headers["x-router-channel"] != "a" and sse_text(raw)[0].startswith("answer from")


async def test_no_splice_after_first_token(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.reply = "one two three four five"
    ups[0].behaviour.drop_after_tokens = 2
    status, raw, headers = await stream_raw(live, "shared-model")
    assert status == 200 and headers["x-router-channel"] == "a"
    text, objs = sse_text(raw)
    assert text == "one two "  # only channel a's words, then an error frame
    assert objs[-1]["error"]["code"] == "stream_interrupted" and "channel a" in objs[-1]["error"]["message"]
    assert not ups[1].requests and not ups[2].requests


async def test_stall_after_first_token_ends_with_error_frame(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.stall_after_tokens = 1
    t0 = time.monotonic()
    status, raw, _ = await stream_raw(live, "tag:fast")
    assert 1.0 <= time.monotonic() - t0 < 3
    text, objs = sse_text(raw)
    assert text == "answer " and objs[-1]["error"]["code"] == "stream_stalled"


async def test_non_stream_fails_over_on_500(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.status = 500
    r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.status_code == 200 and r.headers["x-router-channel"] != "a"
    assert len(ups[0].requests) == 2  # one retry on a, then failover


async def test_cooldown_opens_and_expires(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[1].behaviour.status = 503
    r = await live.chat("gpt-4o")
    assert r.status_code == 502 and "all 2 attempts failed" in r.json()["error"]["message"]
    ch = {c["name"]: c for c in (await live.client.get("/admin/channels", headers=live.admin)).json()["channels"]}
    assert ch["b"]["state"] == "open" and ch["b"]["consecutive_failures"] == 2
    n = len(ups[1].requests)
    r = await live.chat("gpt-4o")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_available_channel"
    assert len(ups[1].requests) == n  # a cooling channel is not called
    ups[1].behaviour.status = 200
    time.sleep(0.35)  # base_s 0.3
    r = await live.chat("gpt-4o")
    assert r.status_code == 200  # the half-open trial passes and closes the circuit
    assert live.router.health["b"].state == "closed"


async def test_auth_failure_is_loud_and_not_permanent(live_router, ups: list[OpenAITestServer],
                                                      caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_TEST_KEY_A", "wrong")
    ups[0].behaviour.api_key = "right"
    live = await live_router()
    with caplog.at_level(logging.ERROR, logger="avatarchat.router"):
        r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.status_code == 200 and r.headers["x-router-channel"] != "a"
    assert len(ups[0].requests) == 1  # no retry against a rejected key
    assert any("credentials rejected" in rec.getMessage() for rec in caplog.records)
    ch = {c["name"]: c for c in (await live.client.get("/admin/channels", headers=live.admin)).json()["channels"]}
    assert ch["a"]["state"] == "auth_failed" and "401" in ch["a"]["auth_error"]
    # The key is fixed (e.g. rotated upstream): the health check clears the state without waiting.
    ups[0].behaviour.api_key = "wrong"
    await live.router.check_health()
    assert live.router.health["a"].snapshot()["state"] == "closed"
    r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.headers["x-router-channel"] == "a"


async def test_health_check_marks_unreachable_and_auth(live_router, ups: list[OpenAITestServer], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = base_config(ups, health={"interval_s": 0.1, "timeout_s": 1})
    cfg["providers"]["c"]["base_url"] = "http://127.0.0.1:9/v1"
    monkeypatch.setenv("ROUTER_TEST_KEY_B", "nope")
    ups[1].behaviour.api_key = "yes"
    live = await live_router(cfg)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and live.router.health["c"].state != "open":
        await __import__("asyncio").sleep(0.05)
    assert live.router.health["c"].state == "open"  # background checks found it down
    assert live.router.health["b"].auth_error is not None
    assert live.router.health["a"].state == "closed"


async def test_client_leaving_mid_stream_releases_the_channel(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.token_delay_s = 0.2
    async with live.client.stream("POST", "/v1/chat/completions", json={"model": "tag:fast", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}) as r:
        async for _ in r.aiter_raw():
            break  # leave after the first bytes
    h = live.router.health["a"]
    for _ in range(100):
        if h.inflight == 0:
            break
        await __import__("asyncio").sleep(0.02)
    assert h.inflight == 0 and h.failures == 0 and h.state == "closed"


async def test_health_probe_does_not_download_the_models_list(live_router, ups: list[OpenAITestServer],
                                                              big_models: BigModelsServer) -> None:
    cfg = base_config(ups, health={"interval_s": 0, "timeout_s": 10})
    cfg["providers"]["a"]["base_url"] = big_models.base_url
    live = await live_router(cfg)
    size = len(big_models.body)
    assert size > 10_000_000
    # What a probe that reads GET /models whole costs: the whole list (and the counter sees it).
    async with httpx.AsyncClient(timeout=20) as c:
        assert len((await c.get(big_models.base_url + "/models")).content) == size
    assert await asyncio.to_thread(big_models.next_sent) == size
    h = live.router.health["a"]
    for _ in range(2):
        h.failure("test error", 500)
    assert h.state == "open"
    await live.router.check_health()
    sent = await asyncio.to_thread(big_models.next_sent)
    assert sent < size / 10, f"the probe took {sent} of {size} bytes"
    assert h.state == "closed"  # the probe still saw the 200 and closed the circuit early
