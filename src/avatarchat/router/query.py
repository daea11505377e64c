"""What a request's ``model`` means: an exact model, an alias, or a tag query (``tag:free,qwen,!local``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SPLIT = re.compile(r"[/:\-_\s@,]+")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)b$")


class QueryError(ValueError):
    """The model string is malformed (a client error)."""


class StrategyError(QueryError):
    """The requested routing strategy is unknown (a client error about the strategy field, not the model)."""


@dataclass(frozen=True, slots=True)
class Query:
    raw: str
    model: str | None = None  # exact model id
    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    alias: str | None = None

    @property
    def is_tags(self) -> bool:
        return self.model is None

    def describe(self) -> str:
        if self.model is not None:
            return f"model {self.model!r}"
        parts = sorted(self.include) + [f"!{t}" for t in sorted(self.exclude)]
        return "tags " + ",".join(parts)


def parse_query(model: str, aliases: dict[str, str] | None = None) -> Query:
    if not isinstance(model, str) or not model.strip():
        raise QueryError("'model' must be a non-empty string")
    model = model.strip()
    alias = None
    if aliases and model in aliases:
        alias, model = model, aliases[model].strip()
    if not model.startswith("tag:"):
        return Query(raw=model, model=model, alias=alias)
    include, exclude = set(), set()
    for part in model[4:].split(","):
        tag = part.strip().lower()
        neg = tag.startswith("!")
        tag = tag.lstrip("!").strip()
        if not tag:
            raise QueryError(f"empty tag in {model!r} (expected e.g. tag:free,qwen,!local)")
        (exclude if neg else include).add(tag)
    if not include:
        raise QueryError(f"tag query {model!r} names no positive tag")
    if include & exclude:
        raise QueryError(f"tag query {model!r} both requires and excludes {sorted(include & exclude)}")
    return Query(raw=model, include=frozenset(include), exclude=frozenset(exclude), alias=alias)


def model_tags(model_id: str) -> set[str]:
    """Tags a model id implies: its pieces (``qwen/qwen-2.5-72b:free`` → qwen, 2.5, 72b, free)."""
    low = model_id.lower()
    return {t for t in _SPLIT.split(low) if t}


def guess_quality(tags: set[str]) -> float:
    """A rough 0..1 quality from the parameter count in the name (7b ≈ 0.28, 70b ≈ 0.62); 0.5 if unknown."""
    for t in tags:
        m = _SIZE.match(t)
        if m:
            size = float(m.group(1))
            if size > 0:
                return round(max(0.05, min(1.0, math.log10(size * 10) / 4)), 3)
    return 0.5
