"""Pure parts: query parsing, config validation, index, strategies, SSE parsing, snapshot."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from avatarchat.router import discovery, sse, strategies
from avatarchat.router.config import DiscoveryConfig, RouterConfigError, load_config, parse_config
from avatarchat.router.health import ChannelHealth
from avatarchat.router.index import Index, discovered_entries, static_entries
from avatarchat.router.query import QueryError, guess_quality, model_tags, parse_query
from avatarchat.router.upstream import UpstreamError, retry_after

CFG = {
    "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}, "loc": {"type": "local"}},
    "channels": [
        {"name": "free1", "provider": "p", "models": ["qwen/qwen-2.5-7b:free"], "cost_in": 0, "cost_out": 0},
        {"name": "paid", "provider": "p", "models": ["qwen/qwen-2.5-72b", "gpt-4o"], "cost_in": 1, "cost_out": 3, "quality": 0.9},
        {"name": "local", "provider": "loc", "models": ["smollm2"]},
        {"name": "wild", "provider": "p", "models": ["*"], "tags": ["disc"]},
    ],
    "aliases": {"best": "gpt-4o", "free": "tag:free,!local"},
}


def test_query_kinds() -> None:
    q = parse_query("tag:free, Qwen,!local")
    assert q.is_tags and q.include == {"free", "qwen"} and q.exclude == {"local"}
    assert parse_query("gpt-4o").model == "gpt-4o"
    a = parse_query("best", {"best": "gpt-4o"})
    assert a.model == "gpt-4o" and a.alias == "best"
    assert parse_query("free", {"free": "tag:free"}).include == {"free"}


@pytest.mark.parametrize("bad, msg", [("tag:", "empty tag"), ("tag:free,,x", "empty tag"), ("tag:!local", "no positive"),
                                      ("tag:a,!a", "both requires and excludes"), ("  ", "non-empty")])
def test_bad_queries(bad: str, msg: str) -> None:
    with pytest.raises(QueryError, match=msg):
        parse_query(bad)


def test_model_tags_and_quality() -> None:
    assert {"qwen", "2.5", "72b", "free"} <= model_tags("qwen/qwen-2.5-72b:free")
    assert guess_quality({"70b"}) > guess_quality({"7b"}) > 0
    assert guess_quality({"chat"}) == 0.5


@pytest.mark.parametrize("mutate, msg", [
    (lambda c: c["channels"][0].update(provider="nope"), "channels.0.provider: unknown provider 'nope' (known: loc, p)"),
    (lambda c: c["channels"][1].update(name="free1"), "channels.1.name: duplicate channel name 'free1'"),
    (lambda c: c["channels"][0].update(cost_in=-1), "channels.0.cost_in"),
    (lambda c: c["channels"][0].update(models=[]), "lists no models"),
    (lambda c: c.update(strategy="fastest"), "strategy"),
    (lambda c: c["providers"]["p"].pop("base_url"), "needs base_url"),
    (lambda c: c["providers"]["p"].update(base_url="ftp://x"), "must start with http"),
    (lambda c: c.update(aliases={"a": "b", "b": "gpt-4o"}), "aliases.a: points to another alias"),
    (lambda c: c.update(unknown_key=1), "unknown_key: unknown key"),
    (lambda c: c.update(discovery={"timeout_s": 0}), "discovery.timeout_s: must be > 0"),
    (lambda c: c.update(discovery={"retry_attempts": -1}), "discovery.retry_attempts: must be >= 0"),
])
def test_config_errors_are_precise(mutate, msg: str) -> None:
    cfg = json.loads(json.dumps(CFG))
    mutate(cfg)
    with pytest.raises(RouterConfigError) as e:
        parse_config(cfg, "r.yaml")
    assert msg in str(e.value) and str(e.value).startswith("r.yaml: ")


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RouterConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("providers: [unclosed")
    with pytest.raises(RouterConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(RouterConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(Path(__file__).parents[2] / "router.example.yaml")
    assert cfg.channels and cfg.strategy in strategies.STATIC


def test_discovery_has_its_own_documented_timeout() -> None:
    cfg = parse_config({**CFG, "health": {"timeout_s": 2}, "discovery": {"timeout_s": 60}})
    assert cfg.discovery.timeout_s == 60 and cfg.health.timeout_s == 2
    assert parse_config(CFG).discovery.timeout_s == 30  # a default of its own, not health's 5 s
    for f in dataclasses.fields(DiscoveryConfig):
        assert f.metadata["doc"], f"discovery.{f.name} has no description"
    example = (Path(__file__).parents[2] / "router.example.yaml").read_text()
    assert all(f"  {f.name}:" in example for f in dataclasses.fields(DiscoveryConfig))  # shown with every key


def build_index() -> tuple[Index, object]:
    cfg = parse_config(CFG)
    idx = Index()
    idx.add(static_entries(cfg))
    disc = [("p", f"vendor/model-{i}b:free", 8192, 0.0, 0.0) for i in range(1, 50)] + [("p", "x/big-405b", None, 5.0, 15.0), ("other", "y", None, None, None)]
    idx.add(discovered_entries(cfg, disc))
    return idx, cfg


def test_index_tags_and_models() -> None:
    idx, _ = build_index()
    assert [e.channel for e in idx.models("gpt-4o")] == ["paid"]
    free = idx.tagged(frozenset({"free"}))
    assert {e.channel for e in free} == {"free1", "local", "wild"}
    assert {e.channel for e in idx.tagged(frozenset({"free"}), frozenset({"local", "disc"}))} == {"free1"}
    assert all("local" in e.tags for e in idx.tagged(frozenset({"local"})))
    assert idx.tagged(frozenset({"nothing"})) == []
    assert len(idx.tagged(frozenset({"disc"}))) == 50  # provider "other" has no wildcard channel
    v = idx.version
    assert idx.tagged(frozenset({"free"})) is free  # cached per version
    idx.add([])
    assert idx.version == v + 1


def _health(name: str, ttft: float | None = None, ok: float = 1.0) -> ChannelHealth:
    from avatarchat.router.config import CooldownConfig

    h = ChannelHealth(name, CooldownConfig())
    h.ewma_ttft_s, h.success_rate = ttft, ok
    return h


def test_strategies_order() -> None:
    idx, cfg = build_index()
    entries = idx.tagged(frozenset({"qwen"})) + idx.models("smollm2")
    health = {c.name: _health(c.name) for c in cfg.channels}
    health["paid"].ewma_ttft_s = 0.05
    health["free1"].ewma_ttft_s = 2.0

    def top(strategy: str) -> str:
        groups = strategies.group_by_channel(strategy, entries)
        return strategies.rank(strategy, groups, health, 3)[0][1].channel

    assert top("cost_first") in ("free1", "local")
    assert top("quality") == "paid"
    assert top("speed") == "paid"
    assert top("local_first") == "local"
    assert top("balanced") in ("free1", "local", "paid")
    health["paid"].state, health["paid"].open_until = "open", time.monotonic() + 60
    excluded: dict[str, str] = {}
    ranked = strategies.rank("quality", strategies.group_by_channel("quality", entries), health, 3, excluded)
    assert "paid" not in {e.channel for _, e in ranked} and "cooling down" in excluded["paid"]


def test_priority_groups_come_first() -> None:
    cfg = json.loads(json.dumps(CFG))
    cfg["channels"][1]["priority"] = 5
    c = parse_config(cfg)
    idx = Index()
    idx.add(static_entries(c))
    health = {ch.name: _health(ch.name) for ch in c.channels}
    g = strategies.group_by_channel("cost_first", idx.tagged(frozenset({"qwen"})))
    assert strategies.rank("cost_first", g, health, 2)[0][1].channel == "paid"


def test_circuit_breaker_and_auth() -> None:
    from avatarchat.router.config import CooldownConfig

    h = ChannelHealth("x", CooldownConfig(failure_threshold=2, base_s=0.05, max_s=1, auth_s=0.05))
    h.failure("boom", 500)
    assert h.unavailable() is None
    h.failure("boom", 500)
    assert "cooling down" in (h.unavailable() or "")
    assert h.snapshot()["state"] == "open"
    time.sleep(0.06)
    assert h.unavailable() is None and h.state == "half_open"
    h.begin()
    assert "trial" in (h.unavailable() or "")
    h.end()
    h.failure("again", 500)  # a failed trial re-opens with a doubled cooldown
    assert h.state == "open" and h.open_until - time.monotonic() > 0.05
    h.auth_failure(401, "bad key")
    assert h.snapshot()["state"] == "auth_failed" and "bad key" in str(h.snapshot()["auth_error"])
    time.sleep(0.11)
    assert h.unavailable() is None or "trial" not in str(h.unavailable())
    h.success(0.1, 0.05)
    assert h.state == "closed" and h.auth_error is None and h.ewma_ttft_s == 0.05


def test_rpm_and_concurrency_limits() -> None:
    from avatarchat.router.config import CooldownConfig

    h = ChannelHealth("x", CooldownConfig(), rpm=2, max_concurrency=5)
    h.begin(); h.end(); h.begin(); h.end()
    assert "rate limit 2 rpm" in (h.unavailable() or "")
    h2 = ChannelHealth("y", CooldownConfig(), max_concurrency=1)
    h2.begin()
    assert "max_concurrency" in (h2.unavailable() or "")


async def test_sse_events_split_anywhere() -> None:
    stream = b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n"

    async def chunks(size: int):
        for i in range(0, len(stream), size):
            yield stream[i : i + size]

    for size in (1, 2, 3, 7, len(stream)):
        got = [p async for p in sse.events(chunks(size))]
        assert got == [b'{"a":1}', b"line1\nline2", b"[DONE]"], size


def test_sse_helpers() -> None:
    assert sse.has_output(b'{"choices":[{"delta":{"content":"x"}}]}')
    assert not sse.has_output(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert sse.has_output(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}')
    assert sse.error_in(b'{"error":{"message":"overloaded"}}') == "overloaded"
    assert sse.error_in(b'{"choices":[]}') is None
    assert sse.error_frame("x").startswith(b"data: {\"error\"") and sse.error_frame("x").endswith(b"\n\n")


def test_retry_after_and_error_classes() -> None:
    assert retry_after("2") == 2.0 and retry_after(None) is None and retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (retry_after(future) or 0) <= 31
    assert UpstreamError("x", status=429).retryable and UpstreamError("x", status=503).retryable
    assert not UpstreamError("x", status=404).retryable and UpstreamError("x", status=401).auth
    assert UpstreamError("x", status=400).client_error and UpstreamError("x", kind="connect").retryable


def test_snapshot_round_trip_and_staleness(tmp_path: Path) -> None:
    cache = tmp_path / "models.json"
    n = discovery.write_cache(cache, {"p": [{"id": "a/b-7b", "context_length": 4096, "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
                                            {"id": "c"}, {"no": "id"}]})
    assert n == 2
    assert json.loads(cache.read_text())["providers"]["p"]["models"][0]["id"] == "a/b-7b"
    models = discovery.read_snapshot(cache)
    assert models == [("p", "a/b-7b", 4096, 1.0, 2.0), ("p", "c", None, None, None)]
    os.utime(cache, ns=(time.time_ns(), time.time_ns() + 10**9))  # the cache changed after the snapshot
    assert discovery.read_snapshot(cache) is None
    assert discovery.build_snapshot(cache) == 2 and discovery.read_snapshot(cache) == models
    assert discovery.main(["snapshot", str(tmp_path / "none.json")]) == 1
    assert discovery.main([]) == 2


@pytest.mark.parametrize("mutate, msg", [
    (lambda c: c["channels"][0].update(priority="high"), "channels.0.priority: must be an integer, got 'high'"),
    (lambda c: c["channels"][0].update(enabled="yes"), "channels.0.enabled: must be true or false"),
    (lambda c: c["channels"][0].update(tags="x"), "channels.0.tags: must be a list"),
    (lambda c: c["channels"][0].pop("provider"), "channels.0.provider: required"),
    (lambda c: c["providers"]["p"].update(headers={"a": 1}), "providers.p.headers.a: must be a string"),
    (lambda c: c.update(retry={"ttft_timeout_s": 0}), "retry.ttft_timeout_s: must be > 0"),
    (lambda c: c.update(retry={"jitter": 2}), "retry.jitter: must be <= 1"),
    (lambda c: c.update(retry=[1]), "retry: must be a mapping"),
    (lambda c: c["channels"][0].update(quality=True), "channels.0.quality: must be a number"),
    (lambda c: c.update(discovery_cache=5), "discovery_cache: must be a string"),
])
def test_config_type_errors_name_the_key(mutate, msg: str) -> None:
    cfg = json.loads(json.dumps(CFG))
    mutate(cfg)
    with pytest.raises(RouterConfigError, match="^r.yaml: ") as e:
        parse_config(cfg, "r.yaml")
    assert msg in str(e.value), str(e.value)
