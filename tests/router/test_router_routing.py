"""Selection over real loopback upstreams: exact models, aliases, tag queries, strategies, explain."""

from __future__ import annotations

from tests.router.conftest import base_config
from tests.support.openai_server import OpenAITestServer


async def test_tag_queries_pick_matching_channels(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    r = await live.chat("tag:qwen,free")
    assert r.status_code == 200 and r.headers["x-router-channel"] == "a"
    assert ups[0].requests[-1]["body"]["model"] == "qwen/qwen-2.5-7b:free"
    r = await live.chat("tag:shared,!fast", router_strategy="cost_first")
    assert r.headers["x-router-channel"] == "c"  # a is excluded by !fast; c is cheaper than b
    assert "router_strategy" not in ups[2].requests[-1]["body"]  # router fields are not forwarded
    r = await live.chat("tag:premium")
    assert r.headers["x-router-channel"] == "b" and r.headers["x-router-model"] in ("gpt-4o", "shared-model")


async def test_alias_resolves(live_router) -> None:
    live = await live_router()
    r = await live.chat("smart")
    assert r.headers["x-router-channel"] == "b" and r.headers["x-router-model"] == "gpt-4o"
    r = await live.chat("anyfree")
    assert r.headers["x-router-channel"] == "a"


async def test_each_strategy_orders_channels(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    picks = {}
    for strategy in ("cost_first", "quality", "balanced", "local_first", "speed"):
        r = await live.client.post("/v1/chat/completions", headers={"x-router-strategy": strategy},
                                   json={"model": "shared-model", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text
        picks[strategy] = r.headers["x-router-channel"]
    assert picks["cost_first"] == "a"  # free
    assert picks["quality"] == "b"  # quality 0.9
    assert picks["balanced"] == "a"


async def test_speed_strategy_follows_measured_latency(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.first_token_delay_s = 0.15
    ups[1].behaviour.first_token_delay_s = 0.08
    # Measure every channel once (tag queries pin the channel), then "speed" must pick the fastest.
    for tag in ("fast", "premium", "cheap"):
        r = await live.chat(f"tag:shared,{tag}", stream=True)
        assert r.status_code == 200
    h = live.router.health
    assert h["c"].ewma_ttft_s < h["b"].ewma_ttft_s < h["a"].ewma_ttft_s
    r = await live.chat("shared-model", router_strategy="speed")
    assert r.headers["x-router-channel"] == "c"


async def test_local_first_prefers_local_channels(live_router, ups: list[OpenAITestServer]) -> None:
    cfg = base_config(ups)
    cfg["providers"]["c"]["type"] = "local"  # a local HTTP server (e.g. llama.cpp's): tagged local, cost 0
    cfg["channels"][2].pop("cost_in"); cfg["channels"][2].pop("cost_out")
    live = await live_router(cfg)
    r = await live.chat("shared-model", router_strategy="local_first")
    assert r.headers["x-router-channel"] == "c"
    r = await live.chat("tag:local")
    assert r.headers["x-router-channel"] == "c"
    r = await live.chat("tag:shared,!local", router_strategy="local_first")
    assert r.headers["x-router-channel"] in ("a", "b")


async def test_explain_shows_scores_and_exclusions(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    live.router.health["b"].auth_failure(401, "invalid api key")
    r = await live.client.get("/admin/explain", params={"model": "tag:shared,!cheap", "strategy": "quality"}, headers=live.admin)
    assert r.status_code == 200, r.text
    ex = r.json()
    assert ex["strategy"] == "quality" and ex["query"] == "tags shared,!cheap"
    assert [c["channel"] for c in ex["candidates"] if c["available"]] == ["a"]
    assert all({"score", "cost_per_1m", "quality", "speed"} <= c.keys() for c in ex["candidates"])
    reasons = {e["channel"]: e["reason"] for e in ex["excluded"]}
    assert "auth failed" in reasons["b"] and "invalid api key" in reasons["b"]
    assert reasons["c"] == "excluded by !cheap"
    assert ex["plan"] == [{"channel": "a", "model": "shared-model"}]
    r = await live.client.post("/admin/explain", json={"model": "gpt-4o"}, headers=live.admin)
    reasons = {e["channel"]: e["reason"] for e in r.json()["excluded"]}
    assert reasons["a"] == "does not serve model 'gpt-4o'"
    r = await live.client.get("/admin/explain", params={"model": "tag:nosuch"}, headers=live.admin)
    assert {e["reason"] for e in r.json()["excluded"]} == {"no model with tag(s) nosuch"}


async def test_models_endpoint_lists_models_and_aliases(live_router) -> None:
    live = await live_router()
    r = await live.client.get("/v1/models")
    ids = [m["id"] for m in r.json()["data"]]
    assert r.json()["object"] == "list"
    assert {"gpt-4o", "llama-3-70b", "shared-model", "smart", "anyfree"} <= set(ids)
    assert ids.count("shared-model") == 1
