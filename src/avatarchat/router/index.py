"""The model index: (channel, model) entries, looked up by model id or tag set.

Built incrementally: the YAML's own models first, then discovered models in batches, so requests are
served from what is ready. Tag-query results are cached per index version.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from avatarchat.router.config import ChannelConfig, RouterConfig
from avatarchat.router.query import guess_quality, model_tags


@dataclass(slots=True, eq=False)
class Entry:
    channel: str
    model: str
    tags: frozenset[str]
    cost_in: float | None
    cost_out: float | None
    quality: float
    priority: int
    local: bool
    context: int | None = None

    @property
    def cost(self) -> float | None:
        """Blended USD per 1M tokens (prompt and completion weighted equally); None if unknown."""
        if self.cost_in is None and self.cost_out is None:
            return None
        return ((self.cost_in or 0.0) + (self.cost_out or 0.0)) / 2


# A discovered model: (provider, model id, context length, USD/1M in, USD/1M out).
Discovered = tuple[str, str, "int | None", "float | None", "float | None"]


def make_entry(cfg: RouterConfig, ch: ChannelConfig, model: str, disc: Discovered | None = None) -> Entry:
    provider = cfg.providers[ch.provider]
    local = provider.type == "local"
    tags = model_tags(model) | {t.lower() for t in ch.tags} | {ch.provider.lower(), ch.name.lower()}
    cost_in = ch.cost_in if ch.cost_in is not None else (disc[3] if disc else None)
    cost_out = ch.cost_out if ch.cost_out is not None else (disc[4] if disc else None)
    if local:
        tags.add("local")
        cost_in = 0.0 if cost_in is None else cost_in
        cost_out = 0.0 if cost_out is None else cost_out
    if cost_in == 0 and cost_out == 0:
        tags.add("free")
    quality = ch.quality if ch.quality is not None else guess_quality(tags)
    return Entry(ch.name, model, frozenset(tags), cost_in, cost_out, quality, ch.priority, local, disc[2] if disc else None)


@dataclass
class Index:
    entries: list[Entry] = field(default_factory=list)
    by_model: dict[str, list[Entry]] = field(default_factory=dict)
    by_tag: dict[str, set[int]] = field(default_factory=dict)
    version: int = 0
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    _cache: OrderedDict[tuple[frozenset[str], frozenset[str], int], list[Entry]] = field(default_factory=OrderedDict)

    def add(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            i = len(self.entries)
            self.entries.append(e)
            self.by_model.setdefault(e.model, []).append(e)
            for t in e.tags:
                s = self.by_tag.get(t)
                if s is None:
                    self.by_tag[t] = {i}
                else:
                    s.add(i)
        self.version += 1

    def models(self, name: str) -> list[Entry]:
        return self.by_model.get(name, [])

    def tagged(self, include: frozenset[str], exclude: frozenset[str] = frozenset()) -> list[Entry]:
        key = (include, exclude, self.version)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        sets = sorted((self.by_tag.get(t, set()) for t in include), key=len)
        ids = set(sets[0]) if sets else set()
        for s in sets[1:]:
            ids &= s
            if not ids:
                break
        for t in exclude:
            if ids:
                ids -= self.by_tag.get(t, set())
        out = [self.entries[i] for i in sorted(ids)]
        self._cache[key] = out
        if len(self._cache) > 512:
            self._cache.popitem(last=False)
        return out

    def model_ids(self) -> list[str]:
        return list(self.by_model)


def static_entries(cfg: RouterConfig) -> list[Entry]:
    """The models the YAML names itself (not "*")."""
    return [make_entry(cfg, ch, m) for ch in cfg.channels if ch.enabled for m in ch.models if m != "*"]


def discovered_entries(cfg: RouterConfig, models: Iterable[Discovered]) -> Iterable[Entry]:
    """Entries for channels with "*": every discovered model of their provider."""
    wild: dict[str, list[ChannelConfig]] = {}
    for ch in cfg.channels:
        if "*" in ch.models and ch.enabled:
            wild.setdefault(ch.provider, []).append(ch)
    if not wild:
        return
    explicit = {(ch.name, m) for ch in cfg.channels for m in ch.models}
    for d in models:
        for ch in wild.get(d[0], ()):
            if (ch.name, d[1]) not in explicit:
                yield make_entry(cfg, ch, d[1], d)
