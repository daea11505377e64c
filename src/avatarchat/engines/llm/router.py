"""The LLM router as the avatar's LLM engine: routes in-process (no HTTP hop to itself). The embedded
llama.cpp model is the router's ``local`` channel when its file has a ``type: local`` provider without
base_url."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

from avatarchat.config import Settings
from avatarchat.engines.llm.base import LLMEngine, LLMError
from avatarchat.pipeline.history import approx_tokens
from avatarchat.router.config import RouterConfigError, load_config
from avatarchat.router.executor import Committed, RouteError, relay
from avatarchat.router.query import QueryError
from avatarchat.router.service import Router


class RouterEngine:
    name = "router"

    def __init__(self, settings: Settings, cpu: Any = None, local: LLMEngine | None = None) -> None:
        self._settings = settings
        self._cpu = cpu  # the CPU scheduler that the local channel's decoding steps run in
        self._conf = settings.llm.router
        self._local: Any = local
        self.router: Router | None = None
        self._view = False

    async def start(self) -> None:
        if self.router is not None:
            return
        path = self._conf.config
        if not path:
            raise LLMError("llm.router.config must name the router's YAML file")
        try:
            cfg = await asyncio.to_thread(load_config, path)
        except RouterConfigError as e:
            raise LLMError(f"LLM router config: {e}") from e
        if self._local is None and any(p.type == "local" and not p.base_url for p in cfg.providers.values()):
            from avatarchat.engines.llm.llama_cpp import LlamaCppEngine

            self._local = LlamaCppEngine(self._settings.llm.llama_cpp, self._settings.llm.system_prompt, self._cpu)
        router = Router(cfg, path, local_engine=self._local)
        # Independent: the local model loads while the router reads its discovery snapshot.
        await asyncio.gather(self._local.start() if self._local is not None else asyncio.sleep(0), router.start())
        router.install_sighup()
        self.router = router

    def with_model(self, model: str) -> RouterEngine:
        """A view of this engine that asks the router for ``model`` (a model, alias or tag query): one
        session's choice. It shares the router and the local model; only the owner closes them."""
        view = copy.copy(self)
        view._conf = self._conf.model_copy(update={"model": model})
        view._view = True
        return view

    @property
    def model(self) -> str:
        return self._conf.model

    def offered_models(self) -> list[str]:
        """What a person can pick: the configured default, the aliases and each channel's listed models."""
        if self.router is None:
            return [self._conf.model]
        cfg = self.router.state.config
        listed = [m for ch in cfg.channels if ch.enabled for m in ch.models if m != "*"]
        return list(dict.fromkeys([self._conf.model, *cfg.aliases, *listed]))

    async def check_model(self, model: str) -> None:
        """Raise LLMError saying why, if no channel can serve ``model`` now."""
        if self.router is None:
            raise LLMError("LLM router not started")
        try:
            await self.router.plan(model, self._conf.strategy)
        except (RouteError, QueryError) as e:
            raise LLMError(f"LLM router: {getattr(e, 'message', e)}") from e

    async def close(self) -> None:
        if self._view:
            return
        if self.router is not None:
            await self.router.close()
            self.router = None
        if self._local is not None:
            await self._local.close()

    def count_tokens(self, text: str) -> int:
        if self._local is not None:
            try:
                return int(self._local.count_tokens(text))
            except Exception:
                pass
        return approx_tokens(text)

    async def stream(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> AsyncIterator[str]:
        if self.router is None:
            raise LLMError("LLM router not started")
        body = {"model": self._conf.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "stream": True}
        try:
            result, _, _ = await self.router.chat(body, self._conf.strategy)
        except (RouteError, QueryError) as e:
            raise LLMError(f"LLM router: {getattr(e, 'message', e)}") from e
        assert isinstance(result, Committed)
        frames = relay(result, self.router.state.config.retry.stall_timeout_s)
        try:
            async for data in frames:  # one or more "data: …\n\n" frames
                for frame in data.split(b"\n\n"):
                    if not frame:
                        continue
                    payload = frame[6:].strip()
                    if payload == b"[DONE]":
                        return
                    obj = json.loads(payload)
                    if obj.get("error"):
                        raise LLMError(f"LLM router: {obj['error'].get('message')}")
                    for choice in obj.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        finally:
            await frames.aclose()
