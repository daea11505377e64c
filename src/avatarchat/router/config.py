"""The router's YAML file: providers, channels, aliases, strategy, retry, cooldown, health, admin.

A channel is one provider + key + set of models, with its own tags, cost, quality and limits. Loading
validates everything; any error names the file and the exact key, and a reload keeps the old config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Strategy = Literal["cost_first", "balanced", "speed", "quality", "local_first"]
STRATEGIES: tuple[str, ...] = ("cost_first", "balanced", "speed", "quality", "local_first")


class RouterConfigError(ValueError):
    """The router config is unusable; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProviderConfig(_Strict):
    type: Literal["openai", "local"] = Field("openai", description="openai: any OpenAI-compatible HTTP API; local: the in-process engine (or a local HTTP server if base_url is set).")
    base_url: str | None = Field(None, description="API root ending in /v1.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    discovery: bool = Field(False, description="Fetch GET /models into the discovery cache.")

    @model_validator(mode="after")
    def _url(self) -> ProviderConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an openai provider needs base_url")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


class ChannelConfig(_Strict):
    name: str = Field(min_length=1)
    provider: str
    models: list[str] = Field(default_factory=list, description='Model ids; "*" adds every discovered model of the provider.')
    tags: list[str] = Field(default_factory=list)
    api_key_env: str | None = Field(None, description="Overrides the provider's key (one channel per key).")
    cost_in: float | None = Field(None, ge=0, description="USD per 1M prompt tokens; default: discovered pricing.")
    cost_out: float | None = Field(None, ge=0, description="USD per 1M completion tokens.")
    quality: float | None = Field(None, ge=0, le=1, description="0..1; default: guessed from the parameter count.")
    priority: int = Field(0, description="Higher priority groups are tried first; the strategy orders within a group.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute this channel accepts.")
    max_concurrency: int | None = Field(None, ge=1, description="Requests in flight at once.")
    enabled: bool = True


class RetryConfig(_Strict):
    max_attempts: int = Field(4, ge=1, le=20, description="Attempts per request across all channels.")
    per_channel_retries: int = Field(1, ge=0, le=5, description="Retries on the same channel before failing over.")
    backoff_base_s: float = Field(0.1, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1, description="Random extra delay, as a fraction of the backoff.")
    max_retry_after_s: float = Field(5.0, ge=0, description="A longer Retry-After cools the channel down and fails over instead of waiting.")
    connect_timeout_s: float = Field(3.0, gt=0)
    ttft_timeout_s: float = Field(15.0, gt=0, description="Longest wait for the first token before failing over.")
    stall_timeout_s: float = Field(30.0, gt=0, description="Longest gap between chunks once streaming.")
    request_timeout_s: float = Field(120.0, gt=0, description="Non-streaming attempt timeout.")


class CooldownConfig(_Strict):
    failure_threshold: int = Field(3, ge=1, description="Consecutive failures that open the circuit.")
    base_s: float = Field(10.0, gt=0, description="First cooldown; doubles on each re-trip.")
    max_s: float = Field(300.0, gt=0)
    auth_s: float = Field(300.0, gt=0, description="Cooldown after 401/403; the health check retries sooner.")


class HealthConfig(_Strict):
    interval_s: float = Field(30.0, ge=0, description="Background health checks (GET /models); 0: off.")
    timeout_s: float = Field(5.0, gt=0)


class AdminConfig(_Strict):
    token_env: str = Field("ROUTER_ADMIN_TOKEN", description="Environment variable holding the admin bearer token.")


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(4 << 20, ge=1024)
    max_messages: int = Field(1000, ge=1)
    index_wait_s: float = Field(5.0, ge=0, description="An unknown model waits this long for a still-building index.")


class RouterConfig(_Strict):
    providers: dict[str, ProviderConfig]
    channels: list[ChannelConfig] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    strategy: Strategy = "balanced"
    discovery_cache: str | None = Field(None, description="Discovery cache JSON (relative to this file); its snapshot sits next to it.")
    discovery_max_age_s: float = Field(86400.0, ge=0, description="Refresh discovered models older than this; 0: never.")
    ewma_alpha: float = Field(0.3, gt=0, le=1)
    loop_lag_probe: bool = Field(False, description="Measure event-loop lag (shown in /admin/stats).")
    upstream_transport: Literal["httptools", "httpcore"] = Field(
        "httptools", description="Wire layer under the httpx client: httptools (lean, the default) or httpx's own httpcore.")
    retry: RetryConfig = RetryConfig()
    cooldown: CooldownConfig = CooldownConfig()
    health: HealthConfig = HealthConfig()
    admin: AdminConfig = AdminConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _references(self) -> RouterConfig:
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
        return self


def parse_config(data: object, source: str = "<config>") -> RouterConfig:
    if not isinstance(data, dict):
        raise RouterConfigError(f"{source}: must hold a mapping at the top level")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
        raise RouterConfigError(f"{source}: " + "; ".join(problems)) from None


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
    cfg = parse_config(data, str(p))
    if cfg.discovery_cache and not Path(cfg.discovery_cache).is_absolute():
        cfg.discovery_cache = str(p.parent / cfg.discovery_cache)
    return cfg
