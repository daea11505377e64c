"""The router's YAML file: providers, channels, aliases, strategy, retry, cooldown, health, admin.

A channel is one provider + key + set of models, with its own tags, cost, quality and limits. Loading
validates everything; any error names the file and the exact key, and a reload keeps the old config.
Plain dataclasses with a small validator (not pydantic): importing and building pydantic models was
~40 % of the router's start-up CPU.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from avatarchat.redact import redact_url

Strategy = Literal["cost_first", "balanced", "speed", "quality", "local_first"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)


class RouterConfigError(ValueError):
    """The router config is unusable; the message names the file and key."""


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, doc: str = "", **rules: Any) -> Any:
    """A field with validation rules: ge, gt, le (numbers), min_len (lists/strings)."""
    meta = {"doc": doc, **rules}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ProviderConfig:
    type: Literal["openai", "local"] = _f("openai", doc="openai: any OpenAI-compatible HTTP API; local: the in-process engine (or a local HTTP server if base_url is set).")
    base_url: str | None = _f(None, doc="API root ending in /v1.")
    api_key_env: str | None = _f(None, doc="Environment variable holding the API key.")
    headers: dict[str, str] = _f(factory=dict, doc="Extra request headers.")
    discovery: bool = _f(False, doc="Fetch GET /models into the discovery cache.")

    def _check(self) -> None:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an openai provider needs base_url")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {redact_url(self.base_url)!r}")

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass
class ChannelConfig:
    name: str = _f(min_len=1)
    provider: str = _f()
    models: list[str] = _f(factory=list, doc='Model ids; "*" adds every discovered model of the provider.')
    tags: list[str] = _f(factory=list)
    api_key_env: str | None = _f(None, doc="Overrides the provider's key (one channel per key).")
    cost_in: float | None = _f(None, ge=0, doc="USD per 1M prompt tokens; default: discovered pricing.")
    cost_out: float | None = _f(None, ge=0, doc="USD per 1M completion tokens.")
    quality: float | None = _f(None, ge=0, le=1, doc="0..1; default: guessed from the parameter count.")
    priority: int = _f(0, doc="Higher priority groups are tried first; the strategy orders within a group.")
    rpm: int | None = _f(None, ge=1, doc="Requests per minute this channel accepts.")
    max_concurrency: int | None = _f(None, ge=1, doc="Requests in flight at once.")
    enabled: bool = True


@dataclass
class RetryConfig:
    max_attempts: int = _f(4, ge=1, le=20, doc="Attempts per request across all channels.")
    per_channel_retries: int = _f(1, ge=0, le=5, doc="Retries on the same channel before failing over.")
    backoff_base_s: float = _f(0.1, ge=0)
    backoff_max_s: float = _f(2.0, ge=0)
    jitter: float = _f(0.5, ge=0, le=1, doc="Random extra delay, as a fraction of the backoff.")
    max_retry_after_s: float = _f(5.0, ge=0, doc="A longer Retry-After cools the channel down and fails over instead of waiting.")
    connect_timeout_s: float = _f(3.0, gt=0)
    ttft_timeout_s: float = _f(15.0, gt=0, doc="Longest wait for the first token before failing over.")
    stall_timeout_s: float = _f(30.0, gt=0, doc="Longest gap between chunks once streaming.")
    request_timeout_s: float = _f(120.0, gt=0, doc="Non-streaming attempt timeout.")


@dataclass
class CooldownConfig:
    failure_threshold: int = _f(3, ge=1, doc="Consecutive failures that open the circuit.")
    base_s: float = _f(10.0, gt=0, doc="First cooldown; doubles on each re-trip.")
    max_s: float = _f(300.0, gt=0)
    auth_s: float = _f(300.0, gt=0, doc="Cooldown after 401/403; the health check retries sooner.")


@dataclass
class HealthConfig:
    interval_s: float = _f(30.0, ge=0, doc="Background health checks (GET /models, only its status and headers read); 0: off.")
    timeout_s: float = _f(5.0, gt=0)


@dataclass
class DiscoveryConfig:
    timeout_s: float = _f(30.0, gt=0, doc="HTTP timeout of a provider's GET /models (to connect, and for each read "
                          "of a list that can be MBs); a health probe reads far less and has its own.")
    retry_base_s: float = _f(5.0, gt=0, doc="Wait before retrying a provider whose GET /models failed; doubles each time.")
    retry_max_s: float = _f(300.0, gt=0, doc="Longest wait between two retries.")
    retry_attempts: int = _f(20, ge=0, doc="Background retries before giving up until the next reload; 0: none. "
                             "Until then a model only that provider could serve answers 503 with Retry-After, not 404.")


@dataclass
class AdminConfig:
    token_env: str = _f("ROUTER_ADMIN_TOKEN", min_len=1, doc="Environment variable holding the admin bearer token.")


@dataclass
class LimitsConfig:
    max_body_bytes: int = _f(4 << 20, ge=1024)
    max_messages: int = _f(1000, ge=1)
    index_wait_s: float = _f(5.0, ge=0, doc="An unknown model waits this long for a still-building index.")


@dataclass
class RouterConfig:
    providers: dict[str, ProviderConfig] = _f()
    channels: list[ChannelConfig] = _f(min_len=1)
    aliases: dict[str, str] = _f(factory=dict)
    strategy: Strategy = "balanced"
    discovery_cache: str | None = _f(None, doc="Discovery cache JSON (relative to this file); its snapshot sits next to it.")
    discovery_max_age_s: float = _f(86400.0, ge=0, doc="Refresh discovered models older than this; 0: never.")
    ewma_alpha: float = _f(0.3, gt=0, le=1)
    loop_lag_probe: bool = _f(False, doc="Measure event-loop lag (shown in /admin/stats).")
    upstream_transport: Literal["httptools", "httpcore"] = _f(
        "httptools", doc="Wire layer under the httpx client: httptools (lean, the default) or httpx's own httpcore.")
    retry: RetryConfig = _f(factory=RetryConfig)
    cooldown: CooldownConfig = _f(factory=CooldownConfig)
    health: HealthConfig = _f(factory=HealthConfig)
    discovery: DiscoveryConfig = _f(factory=DiscoveryConfig)
    admin: AdminConfig = _f(factory=AdminConfig)
    limits: LimitsConfig = _f(factory=LimitsConfig)

    def _check(self) -> None:
        seen: set[str] = set()
        for i, ch in enumerate(self.channels):
            if ch.name in seen:
                raise ValueError(f"channels.{i}.name: duplicate channel name {ch.name!r}")
            seen.add(ch.name)
            if ch.provider not in self.providers:
                known = ", ".join(sorted(self.providers)) or "none"
                raise ValueError(f"channels.{i}.provider: unknown provider {ch.provider!r} (known: {known})")
            if not ch.models:
                raise ValueError(f"channels.{i}.models: channel {ch.name!r} lists no models (use \"*\" for discovered ones)")
        for alias, target in self.aliases.items():
            if target in self.aliases:
                raise ValueError(f"aliases.{alias}: points to another alias {target!r}; aliases resolve one level")
            if not target.strip():
                raise ValueError(f"aliases.{alias}: empty target")


# -- validation -------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _value(tp: Any, v: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, path)
    if origin is Literal:
        if v not in args:
            raise ValueError(f"{path}: must be one of {', '.join(map(str, args))}; got {v!r}")
        return v
    if origin is list:
        if not isinstance(v, list):
            raise ValueError(f"{path}: must be a list, got {type(v).__name__}")
        return [_value(args[0], x, f"{path}.{i}") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{path}: must be a mapping, got {type(v).__name__}")
        return {_value(str, k, f"{path}"): _value(args[1], x, f"{path}.{k}") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, path)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{path}: must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{path}: must be an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{path}: must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ValueError(f"{path}: must be a string, got {v!r}")
        return v
    raise TypeError(f"{path}: unsupported type {_name(tp)}")  # pragma: no cover - a schema bug


def _build(cls: type, data: Any, path: str) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            raise ValueError(f"{prefix}{k}: unknown key (known: {', '.join(fields)})")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: required")
            continue
        v = _value(hints[name], data[name], where)
        m = f.metadata
        if v is not None:
            if "ge" in m and v < m["ge"]:
                raise ValueError(f"{where}: must be >= {m['ge']}, got {v!r}")
            if "gt" in m and v <= m["gt"]:
                raise ValueError(f"{where}: must be > {m['gt']}, got {v!r}")
            if "le" in m and v > m["le"]:
                raise ValueError(f"{where}: must be <= {m['le']}, got {v!r}")
            if "min_len" in m and len(v) < m["min_len"]:
                raise ValueError(f"{where}: must have at least {m['min_len']} item{'s' if m['min_len'] > 1 else ''}")
        kwargs[name] = v
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if not path or msg.startswith(path) else f"{path}: {msg}") from None
    return obj


def parse_config(data: object, source: str = "<config>") -> RouterConfig:
    try:
        return _build(RouterConfig, data, "")
    except ValueError as e:
        raise RouterConfigError(f"{source}: {e}") from None


def load_config(path: str | Path) -> RouterConfig:
    """Read and validate; blocking (call it off the event loop once serving)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RouterConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RouterConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RouterConfigError(f"{p}: must hold a mapping at the top level")
    cfg = parse_config(data, str(p))
    if cfg.discovery_cache and not Path(cfg.discovery_cache).is_absolute():
        cfg.discovery_cache = str(p.parent / cfg.discovery_cache)
    return cfg
