"""Scoring: each strategy's score is a static part (per model: cost, quality) plus a dynamic part (per
channel: EWMA speed, reliability, locality), higher is better. Priority groups come first.

Because the dynamic part is per channel, ranking only looks at the best few models of each channel.
"""

from __future__ import annotations

from collections.abc import Callable

from avatarchat.router.health import ChannelHealth
from avatarchat.router.index import Entry

_PRIOR_TTFT_S = 1.0  # a channel without measurements counts as this fast


def cost_score(e: Entry) -> float:
    c = e.cost
    return 0.3 if c is None else 1.0 / (1.0 + c)


def speed_score(h: ChannelHealth) -> float:
    t = h.ewma_ttft_s if h.ewma_ttft_s is not None else h.ewma_latency_s
    return 1.0 / (1.0 + (_PRIOR_TTFT_S if t is None else t))


STATIC: dict[str, Callable[[Entry], float]] = {
    "cost_first": lambda e: cost_score(e) + 0.001 * e.quality,
    "quality": lambda e: e.quality + 0.01 * cost_score(e),
    "speed": lambda e: 0.01 * cost_score(e),
    "balanced": lambda e: 0.4 * cost_score(e) + 0.2 * e.quality,
    "local_first": lambda e: (1.0 if e.local else 0.0) + 0.4 * cost_score(e) + 0.2 * e.quality,
}

DYNAMIC: dict[str, Callable[[ChannelHealth], float]] = {
    "cost_first": lambda h: 0.01 * speed_score(h) + 0.001 * h.success_rate,
    "quality": lambda h: 0.001 * speed_score(h),
    "speed": lambda h: speed_score(h) + 0.001 * h.success_rate,
    "balanced": lambda h: 0.3 * speed_score(h) + 0.1 * h.success_rate,
    "local_first": lambda h: 0.3 * speed_score(h) + 0.1 * h.success_rate,
}


def score_parts(strategy: str, e: Entry, h: ChannelHealth) -> dict[str, float]:
    return {
        "score": round(STATIC[strategy](e) + DYNAMIC[strategy](h), 6),
        "cost_per_1m": -1.0 if e.cost is None else round(e.cost, 6),
        "quality": e.quality,
        "speed": round(speed_score(h), 4),
        "success_rate": round(h.success_rate, 4),
        "priority": e.priority,
    }


def group_by_channel(strategy: str, entries: list[Entry]) -> dict[str, list[Entry]]:
    """Each channel's entries, best static score first (cached by the caller per query and version)."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.channel, []).append(e)
    key = STATIC[strategy]
    for lst in groups.values():
        lst.sort(key=key, reverse=True)
    return groups


def rank(strategy: str, groups: dict[str, list[Entry]], health: dict[str, ChannelHealth], k: int,
         excluded: dict[str, str] | None = None, per_channel: int = 1) -> list[tuple[float, Entry]]:
    """The best ``k`` available entries, at most ``per_channel`` from each channel (failing over to another
    channel is what helps); unavailable channels go to ``excluded`` with their reason."""
    static, dynamic = STATIC[strategy], DYNAMIC[strategy]
    scored: list[tuple[int, float, Entry]] = []
    for channel, lst in groups.items():
        h = health[channel]
        why = h.unavailable()
        if why is not None:
            if excluded is not None:
                excluded[channel] = why
            continue
        d = dynamic(h)
        for e in lst[:per_channel]:
            scored.append((e.priority, static(e) + d, e))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [(s, e) for _, s, e in scored[:k]]
