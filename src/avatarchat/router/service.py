"""The router: config state (swapped whole on reload), index, channel health, upstreams, background work."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from avatarchat.router import discovery, executor, strategies
from avatarchat.router.config import STRATEGIES, RouterConfig, RouterConfigError, load_config
from avatarchat.router.executor import Candidate, RouteError
from avatarchat.router.health import ChannelHealth
from avatarchat.router.index import Discovered, Entry, Index, discovered_entries, static_entries
from avatarchat.router.query import Query, StrategyError, parse_query
from avatarchat.router.upstream import HttpUpstream, LocalUpstream, Target, Upstream, upstream_error

log = logging.getLogger("avatarchat.router")
_BATCH = 1000  # entries added to the index per event-loop turn (a few ms)


@dataclass
class State:
    """Everything derived from one config version; requests hold the one they started with."""

    config: RouterConfig
    index: Index
    targets: dict[str, Target]  # channel → target template (model filled in per entry)
    generation: int
    discovered: list[Discovered] | None = None  # the snapshot's models, as soon as they are read
    snapshot_read: asyncio.Event = field(default_factory=asyncio.Event)
    # Providers (with a "*" channel) whose discovered models may still arrive: being read or fetched, or
    # failed and retried. While one is, a model no channel serves yet answers 503 + Retry-After, not 404.
    pending: set[str] = field(default_factory=set)
    discovery_errors: dict[str, str] = field(default_factory=dict)  # provider → why its GET /models failed
    retry_at: float | None = None  # monotonic time of the next discovery retry
    groups: OrderedDict[tuple[Query, str, int], dict[str, list[Entry]]] = field(default_factory=OrderedDict)

    def target(self, e: Entry) -> Target:
        t = self.targets[e.channel]
        return Target(e.channel, e.model, t.url, t.headers, t.local)

    def waiting_channels(self) -> list[str]:
        """The "*" channels whose provider's discovery is still pending."""
        return [ch.name for ch in self.config.channels if ch.enabled and "*" in ch.models and ch.provider in self.pending]


def _wild_providers(cfg: RouterConfig) -> set[str]:
    return {ch.provider for ch in cfg.channels if ch.enabled and "*" in ch.models}


def _targets(cfg: RouterConfig) -> dict[str, Target]:
    out = {}
    for ch in cfg.channels:
        p = cfg.providers[ch.provider]
        headers = {"content-type": "application/json", **p.headers}
        key = os.environ.get(ch.api_key_env, "") if ch.api_key_env else p.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        url = p.base_url.rstrip("/") + "/chat/completions" if p.base_url else ""
        out[ch.name] = Target(ch.name, "", url, headers, local=p.type == "local" and not p.base_url)
    return out


class Router:
    def __init__(self, config: RouterConfig, path: str | Path | None = None, local_engine: Any = None) -> None:
        self.path = Path(path) if path else None
        self.local = LocalUpstream(local_engine) if local_engine is not None else None
        self.http = HttpUpstream(config.retry, config.upstream_transport)
        self.health: dict[str, ChannelHealth] = {}
        self.state = self._new_state(config, 1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._discovery: asyncio.Task[Any] | None = None  # the current state's discovery work (retries, refresh)
        self._reload_lock = asyncio.Lock()
        self.started_at = time.monotonic()
        self.max_loop_lag_ms = 0.0
        self.max_loop_cpu_ms = 0.0
        self.index_seconds: float | None = None
        self.reloads = 0
        self._sighup = False

    # -- state ---------------------------------------------------------------------------------
    def _new_state(self, cfg: RouterConfig, generation: int) -> State:
        health = {}
        for ch in cfg.channels:
            h = self.health.get(ch.name) or ChannelHealth(ch.name, cfg.cooldown)
            h.cooldown, h.alpha, h.rpm, h.max_concurrency = cfg.cooldown, cfg.ewma_alpha, ch.rpm, ch.max_concurrency
            health[ch.name] = h
        self.health = health
        index = Index()
        index.add(static_entries(cfg))
        pending = _wild_providers(cfg) if cfg.discovery_cache else set()
        return State(cfg, index, _targets(cfg), generation, pending=pending)

    async def _fill(self, state: State, models: list[Discovered]) -> None:
        """Add discovered models in batches: requests are served from the entries already in."""
        state.discovered = models
        state.snapshot_read.set()
        cfg = state.config
        entries = await asyncio.to_thread(lambda: list(discovered_entries(cfg, models)))
        for i in range(0, len(entries), _BATCH):
            state.index.add(entries[i : i + _BATCH])
            await asyncio.sleep(0)
        state.index.complete.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("router background task failed", extra={"task": t.get_name(), "error": repr(t.exception())})

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Returns at once: discovery, health checks and the loop-lag probe start in parallel."""
        self._discovery = self._spawn(self._start_discovery(self.state), "router-discovery")
        if self.state.config.health.interval_s > 0:
            self._spawn(self._health_loop(), "router-health")
        if self.state.config.loop_lag_probe:
            self._spawn(self._lag_probe(), "router-lag-probe")

    async def close(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.close()

    def install_sighup(self) -> bool:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_logged(), "router-sighup"))
        except (NotImplementedError, RuntimeError, AttributeError, ValueError):
            return False  # not the main thread, or no signals here
        self._sighup = True
        return True

    async def _reload_logged(self) -> None:
        try:
            info = await self.reload()
            log.info("router config reloaded on SIGHUP", extra=info)
        except RouterConfigError as e:
            log.error("router config rejected; the running config stays in force", extra={"error": str(e)})

    async def reload(self, path: str | Path | None = None) -> dict[str, object]:
        """Load, validate and index the new config off to the side, then swap it in. On any error the
        running config stays and RouterConfigError says exactly what is wrong. Discovery runs again, as on
        a restart: the cache's snapshot is re-read, or each provider's GET /models fetched if there is none."""
        p = Path(path) if path else self.path
        if p is None:
            raise RouterConfigError("this router was not started from a file; nothing to reload")
        async with self._reload_lock:
            t0 = time.perf_counter()
            cfg = await asyncio.to_thread(load_config, p)
            state = self._new_state(cfg, self.state.generation + 1)
            fetched = await self._discover(state)
            self.http.retry = cfg.retry
            self.state = state
            self.path = p
            self.reloads += 1
            if self._discovery is not None:
                self._discovery.cancel()  # the old state's retries or refresh: this state has its own
            self._discovery = self._spawn(self._follow_up(state, fetched), "router-discovery")
            return {"generation": state.generation, "channels": len(cfg.channels), "entries": len(state.index.entries),
                    "discovery_errors": state.discovery_errors, "seconds": round(time.perf_counter() - t0, 4)}

    async def _start_discovery(self, state: State) -> None:
        await self._follow_up(state, await self._discover(state))

    async def _discover(self, state: State) -> dict[str, list[dict[str, Any]]] | None:
        """Fill the index with discovered models: from the cache's snapshot, else from each discovery
        provider's GET /models. Returns what was fetched (None: the cache was read)."""
        cfg = state.config
        cache = cfg.discovery_cache
        t0 = time.perf_counter()
        if not cache or not state.pending:
            state.snapshot_read.set()
            state.index.complete.set()
            return None
        models = await asyncio.to_thread(discovery.read_snapshot, cache)
        if models is None and Path(cache).is_file():
            log.info("discovery snapshot missing or stale; rebuilding it", extra={"cache": cache})
            try:
                await discovery.rebuild_snapshot(cache)
                models = await asyncio.to_thread(discovery.read_snapshot, cache)
            except RuntimeError as e:
                log.error("cannot read the discovery cache", extra={"error": str(e)})
        fetched = None
        if models is None:
            names = [n for n, p in cfg.providers.items() if p.discovery and p.base_url]
            fetched, errors = await self._fetch(cfg, names)
            if names and not errors:  # a partial result is served but not cached: a restart fetches again
                await asyncio.to_thread(discovery.write_cache, Path(cache), fetched)
            models = discovery.flatten(fetched)
            self._discovery_result(state, errors, retrying=cfg.discovery.retry_attempts > 0)
        else:
            self._discovery_result(state, {}, retrying=False)
        await self._fill(state, models)
        self.index_seconds = round(time.perf_counter() - t0, 4)
        log.info("router index complete", extra={"entries": len(state.index.entries), "seconds": self.index_seconds})
        return fetched

    @staticmethod
    def _discovery_result(state: State, errors: dict[str, str], retrying: bool) -> None:
        """Set before the index is filled, so a request that waited for it sees whether more may come."""
        state.discovery_errors = errors
        state.pending = (set(errors) & state.pending) if retrying else set()
        state.retry_at = None

    async def _follow_up(self, state: State, fetched: dict[str, list[dict[str, Any]]] | None) -> None:
        """In the background: retry the providers whose GET /models failed, or refresh a cache that is old."""
        if fetched is None:
            await self._refresh_if_old(state)
        elif state.discovery_errors:
            if state.config.discovery.retry_attempts > 0:
                await self._retry_discovery(state, fetched)
            else:
                log.error("model discovery failed; POST /admin/reload (or SIGHUP) tries again",
                          extra={"errors": state.discovery_errors})

    async def _retry_discovery(self, state: State, fetched: dict[str, list[dict[str, Any]]]) -> None:
        """Re-fetch the failed providers with exponential backoff (bounded in time and attempts). Each
        answer is indexed to the side and swapped in, like a reload; the cache is written once all answered."""
        d, cache = state.config.discovery, state.config.discovery_cache
        assert cache is not None  # discovery fetches only to fill a cache
        for attempt in range(d.retry_attempts):
            delay = min(d.retry_max_s, d.retry_base_s * 2**attempt)
            state.retry_at = time.monotonic() + delay
            log.warning("model discovery failed; retrying", extra={"errors": state.discovery_errors, "in_s": delay})
            await asyncio.sleep(delay)
            got, errors = await self._fetch(state.config, list(state.discovery_errors))
            last = attempt == d.retry_attempts - 1
            if not got:
                self._discovery_result(state, errors, retrying=not last)
                continue
            fetched.update(got)
            new = await self._swap(state, discovery.flatten(fetched), errors, retrying=not last)
            if new is None:
                return  # reloaded meanwhile
            state = new
            if not errors:
                await asyncio.to_thread(discovery.write_cache, Path(cache), fetched)
                log.info("model discovery succeeded on retry", extra={"generation": state.generation})
                return
        log.error("model discovery failed; gave up retrying until POST /admin/reload (or SIGHUP)",
                  extra={"errors": state.discovery_errors, "attempts": d.retry_attempts})

    async def _swap(self, state: State, models: list[Discovered], errors: dict[str, str], retrying: bool) -> State | None:
        """A new index of state's config with these models, built to the side and swapped in (None if a
        reload replaced state meanwhile: that one has its own discovery)."""
        async with self._reload_lock:
            if self.state is not state:
                return None
            new = self._new_state(state.config, state.generation + 1)
            self._discovery_result(new, errors, retrying)
            await self._fill(new, models)
            self.state = new
            return new

    async def _refresh_if_old(self, state: State) -> None:
        """Re-fetch GET /models when the cache is older than discovery_max_age_s; the old cache stays unless
        every provider answered."""
        cfg = state.config
        names = [n for n, p in cfg.providers.items() if p.discovery and p.base_url]
        if not cfg.discovery_max_age_s or not cfg.discovery_cache or not names:
            return
        try:
            age = time.time() - Path(cfg.discovery_cache).stat().st_mtime
        except OSError:
            age = float("inf")
        if age < cfg.discovery_max_age_s:
            return
        fetched, errors = await self._fetch(cfg, names)
        if errors:
            log.warning("discovery refresh failed; the old cache stays", extra={"errors": errors})
            return
        await asyncio.to_thread(discovery.write_cache, Path(cfg.discovery_cache), fetched)
        new = await self._swap(state, discovery.flatten(fetched), {}, retrying=False)
        if new is not None:
            log.info("discovery refreshed", extra={"models": len(new.discovered or ()), "generation": new.generation})

    async def _fetch(self, cfg: RouterConfig, names: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
        """GET /models from the named providers, in parallel: (each answer's models, each failure's reason)."""

        async def one(name: str) -> tuple[str, list[dict[str, Any]] | None, str]:
            p = cfg.providers[name]
            headers = dict(p.headers)
            if key := p.api_key():
                headers["authorization"] = f"Bearer {key}"
            try:
                r = await self.http.client.get(p.base_url.rstrip("/") + "/models", headers=headers,  # type: ignore[union-attr]
                                               timeout=cfg.discovery.timeout_s)
                r.raise_for_status()
                data = r.json().get("data") or []
                return name, [m for m in data if isinstance(m, dict)], ""
            except httpx.HTTPStatusError as e:
                why = f"HTTP {e.response.status_code}"
            except httpx.HTTPError as e:
                why = upstream_error(e).message
            except (ValueError, AttributeError, TypeError) as e:
                why = f"not an OpenAI model list: {e}"
            log.warning("model discovery failed", extra={"provider": name, "error": why})
            return name, None, why

        got: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        for name, models, why in await asyncio.gather(*(one(n) for n in names)):
            if models is None:
                errors[name] = why
            else:
                got[name] = models
        return got, errors

    async def _health_loop(self) -> None:
        while True:
            interval = self.state.config.health.interval_s  # re-read: a reload may change it
            await asyncio.sleep(interval if interval > 0 else 60.0)
            if self.state.config.health.interval_s > 0:
                await self.check_health()

    async def check_health(self) -> None:
        """Probe each HTTP channel's GET /models; a pass clears a cooldown or an auth failure early."""
        state = self.state
        cfg = state.config

        async def one(name: str, t: Target) -> None:
            base = t.url.removesuffix("/chat/completions")
            status, detail = await self.http.probe(base, {k: v for k, v in t.headers.items() if k != "content-type"}, cfg.health.timeout_s)
            h = self.health.get(name)
            if h is None:
                return
            if status == 200:
                if h.state != "closed" or h.auth_error:
                    h.recovered()
            elif status in (401, 403):
                h.auth_failure(status, detail)
            elif status == 0 or status >= 500:
                h.failure(f"health check: {detail or status}", status or None)

        await asyncio.gather(*(one(n, t) for n, t in state.targets.items() if not t.local and t.url))

    async def _lag_probe(self) -> None:
        """Wall-clock lag of a 10 ms timer, and the loop thread's CPU time between two ticks: on a shared
        machine the first includes time the OS ran other processes; the second is what our own callbacks
        held the loop for (an upper bound on the longest one)."""
        loop = asyncio.get_running_loop()
        while True:
            t, c = loop.time(), time.thread_time()
            await asyncio.sleep(0.01)
            lag = (loop.time() - t - 0.01) * 1000
            cpu = (time.thread_time() - c) * 1000
            self.max_loop_lag_ms = max(self.max_loop_lag_ms, lag)
            self.max_loop_cpu_ms = max(self.max_loop_cpu_ms, cpu)

    # -- routing -------------------------------------------------------------------------------
    def _upstream(self, t: Target) -> Upstream | None:
        return (self.local if t.local else self.http)

    def _groups(self, state: State, q: Query, strategy: str) -> dict[str, list[Entry]]:
        key = (q, strategy, state.index.version)
        g = state.groups.get(key)
        if g is None:
            entries = state.index.models(q.model) if q.model is not None else state.index.tagged(q.include, q.exclude)
            g = strategies.group_by_channel(strategy, entries)
            state.groups[key] = g
            if len(state.groups) > 512:
                state.groups.popitem(last=False)
        return g

    def parse(self, model: str, state: State | None = None) -> Query:
        return parse_query(model, (state or self.state).config.aliases)

    def decide(self, state: State, q: Query, strategy: str, excluded: dict[str, str] | None = None,
               groups: dict[str, list[Entry]] | None = None) -> list[Candidate]:
        """The ordered failover plan (sync, no I/O: this is the routing decision)."""
        if groups is None:
            groups = self._groups(state, q, strategy)
        k = state.config.retry.max_attempts
        out = []
        for _, e in strategies.rank(strategy, groups, self.health, k + 2, excluded):
            t = state.target(e)
            up = self._upstream(t)
            if up is None:
                if excluded is not None:
                    excluded[e.channel] = "local engine not loaded in this process"
                continue
            out.append(Candidate(e, t, self.health[e.channel], up))
        return out

    async def plan(self, model: str, strategy: str | None) -> tuple[State, Query, str, list[Candidate]]:
        state = self.state
        strategy = _strategy(state, strategy)
        q = self.parse(model, state)
        groups = self._groups(state, q, strategy)
        if not groups and not state.index.complete.is_set():
            groups = await self._cold_lookup(state, q, strategy)
        if not groups:
            raise self._not_found(state, q)
        excluded: dict[str, str] = {}
        cands = self.decide(state, q, strategy, excluded, groups)
        if not cands:
            reasons = "; ".join(f"{c}: {r}" for c, r in excluded.items())
            retry = min((self.health[c].retry_in() for c in excluded if c in self.health), default=1.0)
            raise RouteError(503, f"no available channel for {q.describe()}: {reasons}", "no_available_channel",
                             retry_after=max(1.0, retry))
        return state, q, strategy, cands

    def _not_found(self, state: State, q: Query) -> RouteError:
        """404, unless a channel whose provider's discovery is still pending could serve it: then 503 with
        Retry-After, which SDKs retry (a 404 they would not)."""
        what = q.describe() + (f" (alias {q.alias!r})" if q.alias else "")
        waiting = state.waiting_channels()
        if waiting:
            if state.retry_at is None:
                why, retry = "is in progress", 1.0
            else:
                retry = max(1.0, state.retry_at - time.monotonic())
                why = f"failed and is retried in {retry:.0f} s"
            return RouteError(503, f"no channel serves {what} yet: model discovery for channel(s) {', '.join(waiting)} {why}",
                              "discovery_pending", "server_error", retry_after=retry)
        failed = sorted(p for p in state.discovery_errors if p in _wild_providers(state.config))
        hint = f" (model discovery failed for provider(s) {', '.join(failed)}; POST /admin/reload tries again)" if failed else ""
        return RouteError(404, f"no channel serves {what}{hint}", "model_not_found", "invalid_request_error")

    async def _cold_lookup(self, state: State, q: Query, strategy: str) -> dict[str, list[Entry]]:
        """The index is still being built. An exact model is found by one scan of the snapshot's models
        (~1 ms for 10,000) as soon as they are read; a tag query waits for the index (bounded)."""
        wait = state.config.limits.index_wait_s
        try:
            if q.model is not None:
                await asyncio.wait_for(state.snapshot_read.wait(), wait)
                groups = self._groups(state, q, strategy)
                if groups or state.index.complete.is_set():
                    return groups
                found = [d for d in state.discovered or () if d[1] == q.model]
                entries = list(discovered_entries(state.config, found))
                return strategies.group_by_channel(strategy, entries)
            await asyncio.wait_for(state.index.complete.wait(), wait)
        except TimeoutError:
            pass
        return self._groups(state, q, strategy)

    async def chat(self, body: dict[str, Any], strategy: str | None = None) -> tuple[bytes | executor.Committed, Candidate, list[executor.AttemptLog]]:
        state, _, _, cands = await self.plan(body["model"], strategy)
        return await executor.run(cands, body, state.config.retry, bool(body.get("stream")))

    def explain(self, model: str, strategy: str | None = None, limit: int = 50) -> dict[str, object]:
        state = self.state
        strategy = _strategy(state, strategy)
        q = self.parse(model, state)
        groups = self._groups(state, q, strategy)
        excluded: dict[str, str] = {}
        plan = self.decide(state, q, strategy, excluded)
        scored = []
        for ch, lst in groups.items():
            h = self.health[ch]
            for e in lst[:limit]:
                scored.append({"channel": ch, "model": e.model, "available": ch not in excluded,
                               "tags": sorted(e.tags), **strategies.score_parts(strategy, e, h)})
        scored.sort(key=lambda d: (d["available"], d["priority"], d["score"]), reverse=True)
        for ch in state.config.channels:
            if ch.name in groups or ch.name in excluded:
                continue
            excluded[ch.name] = self._why_not(state, q, ch.name)
        return {
            "model": model, "query": q.describe(), "alias": q.alias, "strategy": strategy,
            "index": {"entries": len(state.index.entries), "complete": state.index.complete.is_set()},
            "plan": [{"channel": c.entry.channel, "model": c.entry.model} for c in plan[: state.config.retry.max_attempts]],
            "candidates": scored[:limit],
            "candidate_count": sum(len(v) for v in groups.values()),
            "excluded": [{"channel": c, "reason": r} for c, r in excluded.items()],
        }

    def _why_not(self, state: State, q: Query, channel: str) -> str:
        ch = next(c for c in state.config.channels if c.name == channel)
        if not ch.enabled:
            return "disabled"
        if channel in state.waiting_channels():
            return f"model discovery for provider {ch.provider!r} is still pending"
        if q.model is not None:
            return f"does not serve model {q.model!r}"
        with_include = [e for e in state.index.tagged(q.include) if e.channel == channel]
        if with_include:
            hit = sorted({t for e in with_include for t in e.tags & q.exclude})
            return f"excluded by {', '.join('!' + t for t in hit)}"
        missing = sorted(t for t in q.include if not any(e.channel == channel for e in state.index.tagged(frozenset([t]))))
        return f"no model with tag(s) {', '.join(missing) or ','.join(sorted(q.include))}"

    def channels(self) -> list[dict[str, object]]:
        state = self.state
        out = []
        for ch in state.config.channels:
            t = state.targets[ch.name]
            out.append({"name": ch.name, "provider": ch.provider, "enabled": ch.enabled, "local": t.local,
                        "tags": ch.tags, "priority": ch.priority, **self.health[ch.name].snapshot()})
        return out

    def stats(self) -> dict[str, object]:
        s = self.state
        return {"generation": s.generation, "reloads": self.reloads, "entries": len(s.index.entries),
                "index_complete": s.index.complete.is_set(), "index_seconds": self.index_seconds,
                "max_loop_lag_ms": round(self.max_loop_lag_ms, 3) if s.config.loop_lag_probe else None,
                "max_loop_cpu_ms": round(self.max_loop_cpu_ms, 3) if s.config.loop_lag_probe else None,
                "uptime_s": round(time.monotonic() - self.started_at, 3),
                "discovery": {"pending": sorted(s.pending), "errors": s.discovery_errors,
                              "retry_in_s": None if s.retry_at is None else round(max(0.0, s.retry_at - time.monotonic()), 3)}}


def _strategy(state: State, strategy: str | None) -> str:
    """The request's strategy, else the config's; StrategyError for an unknown one."""
    strategy = strategy or state.config.strategy
    if strategy not in STRATEGIES:
        raise StrategyError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    return strategy
