"""The embedded LLM (llama.cpp, SmolLM2-135M) serving several conversations at once (issue 13)."""

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest

from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import LLMError, conversation
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine, default_model_path, shifted_reuse
from avatarchat.pipeline.scheduler import CpuScheduler

pytestmark = pytest.mark.models

SYSTEM = "Answer briefly."
MSGS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
async def cpu() -> CpuScheduler:
    scheduler = CpuScheduler(2)
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="module")
async def llama(cpu: CpuScheduler) -> LlamaCppEngine:
    e = LlamaCppEngine(LlamaCppConfig(parallel=4), SYSTEM, cpu)
    await e.start()
    yield e
    await e.close()


async def _reply(llm: LlamaCppEngine, messages: list[dict[str, str]], who: str | None = None, max_tokens: int = 8) -> str:
    async def run() -> str:
        conversation.set(who)
        return "".join([d async for d in llm.stream(messages, max_tokens=max_tokens, temperature=0.0)])

    return await asyncio.create_task(run())  # its own context, as a session's turn task


def test_model_file_is_the_packaged_gguf() -> None:
    p = default_model_path()
    assert p.is_file() and p.suffix == ".gguf" and p.stat().st_size > 50_000_000


async def test_streams_text(llama: LlamaCppEngine) -> None:
    text = await _reply(llama, MSGS, max_tokens=24)
    assert len(text.strip()) > 0 and "<|im" not in text
    assert llama.count_tokens("hello world") >= 2


async def test_cancel_stops_generation_and_the_next_request_works(llama: LlamaCppEngine) -> None:
    threads = threading.active_count()
    stream = llama.stream(MSGS, max_tokens=200, temperature=0.0)
    first = await anext(stream)
    await stream.aclose()
    assert first
    steps = llama.steps
    await asyncio.sleep(0.3)
    assert llama.steps - steps <= 1  # the cancelled reply stopped decoding
    text = await asyncio.wait_for(_reply(llama, MSGS), timeout=30)
    assert text.strip()
    assert threading.active_count() == threads  # still the one decoding thread: none started, none leaked


async def test_missing_model_file() -> None:
    e = LlamaCppEngine(LlamaCppConfig(model_path="/nonexistent/model.gguf"))
    with pytest.raises(LLMError, match="not found"):
        await e.start()
    await e.close()


def test_shifted_reuse_finds_the_trimmed_block() -> None:
    system, old_turn, kept, new = list(range(10)), list(range(100, 140)), list(range(200, 260)), [7, 7, 7]
    assert shifted_reuse(system + old_turn + kept, system + kept + new) == (10, 50)
    # The cached tail (say, the tokens of a cancelled reply) need not be in the new prompt.
    assert shifted_reuse(system + old_turn + kept + [5, 5], system + kept + new) == (10, 50)
    assert shifted_reuse(system + kept, system + kept + new) is None  # a plain prefix: nothing to cut
    assert shifted_reuse(system + old_turn + kept[:5], system + kept[:5]) is None  # too little left to keep
    assert shifted_reuse([1, 2, 3], [9, 9, 9]) is None
    # The same 20 tokens again later in a long history is a coincidence, not a trim.
    repeat = list(range(300, 320))
    old = system + list(range(400, 450)) + repeat + list(range(500, 600))
    assert shifted_reuse(old, system + repeat + [8]) is None


def _history(n: int) -> list[dict[str, str]]:
    history = [{"role": "system", "content": SYSTEM}]
    for i in range(n):
        history += [{"role": "user", "content": f"Question number {i} about the sea and the sky?"},
                    {"role": "assistant", "content": f"Answer number {i}: the sea is wide and the sky is high."}]
    return history


async def test_trimmed_history_reuses_the_kv_cache(llama: LlamaCppEngine) -> None:
    """After the oldest turn is dropped, only the new suffix is evaluated: the prompt is not re-read."""
    history = _history(6)
    full = history + [{"role": "user", "content": "And the moon?"}]
    await _reply(llama, full, "trim", max_tokens=4)
    trimmed = [history[0]] + history[3:] + [{"role": "user", "content": "And the moon?"}]
    before = llama.prompt_tokens
    out = await _reply(llama, trimmed, "trim")
    assert out.strip()
    assert llama.prompt_tokens - before < 15, llama.prompt_tokens - before  # of a ~150-token prompt


async def test_prefill_leaves_only_the_new_words_to_evaluate(llama: LlamaCppEngine) -> None:
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there."},
               {"role": "assistant", "content": "Hello! How can I help?"}]

    async def prefill() -> None:
        conversation.set("prefill")
        await llama.prefill(history)

    await asyncio.create_task(prefill())
    before = llama.prompt_tokens
    out = await _reply(llama, history + [{"role": "user", "content": "Name a colour."}], "prefill")
    assert out.strip()
    assert llama.prompt_tokens - before < 15  # the person's words and the assistant header
    before = llama.prompt_tokens
    await asyncio.create_task(prefill())  # the history is in the cache already: little left to evaluate
    assert llama.prompt_tokens - before < 20


async def test_sessions_never_re_evaluate_each_others_prompts(llama: LlamaCppEngine) -> None:
    a, b = _history(4), _history(5)
    a[1]["content"] = "Tell me about apples."  # two different conversations
    await _reply(llama, a + [{"role": "user", "content": "Why?"}], "A")
    await _reply(llama, b + [{"role": "user", "content": "Why?"}], "B")
    # A's next turn, after B's: only A's new words are evaluated, not A's whole history again.
    before = llama.prompt_tokens
    await _reply(llama, a + [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."},
                             {"role": "user", "content": "Really?"}], "A")
    assert llama.prompt_tokens - before < 25


async def test_concurrent_replies_decode_in_one_batch(llama: LlamaCppEngine) -> None:
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
               for q in ("Count to five.", "Name three fruits.", "Describe the sea.", "What is a cat?")]
    steps = llama.steps
    texts = await asyncio.gather(*(_reply(llama, p, f"batch{i}", max_tokens=24) for i, p in enumerate(prompts)))
    assert all(t.strip() for t in texts)
    # One after another, 4 replies of up to 24 tokens need up to ~100 steps; batched, about one per token.
    assert llama.steps - steps < 45, llama.steps - steps


async def test_a_reply_nobody_reads_pauses_and_others_go_on(cpu: CpuScheduler) -> None:
    e = LlamaCppEngine(LlamaCppConfig(parallel=2, max_unread=4), SYSTEM, cpu)
    await e.start()
    try:
        stalled = e.stream(MSGS, max_tokens=200, temperature=0.0)
        await anext(stalled)
        await asyncio.sleep(0.3)
        job = e._jobs[0]
        assert job.generated <= 4 + 2  # it waits for its reader instead of racing ahead
        assert (await _reply(e, [MSGS[0], {"role": "user", "content": "Say yes."}], "other")).strip()
        await stalled.aclose()
    finally:
        await e.close()


async def test_more_conversations_than_sequences_take_turns(cpu: CpuScheduler) -> None:
    e = LlamaCppEngine(LlamaCppConfig(parallel=2), SYSTEM, cpu)
    await e.start()
    try:
        texts = await asyncio.gather(*(_reply(e, [MSGS[0], {"role": "user", "content": f"Say {w}."}], w)
                                       for w in ("one", "two", "three", "four", "five")))
        assert all(t.strip() for t in texts)
    finally:
        await e.close()


async def test_a_full_context_is_a_clear_error_and_the_engine_recovers(cpu: CpuScheduler) -> None:
    e = LlamaCppEngine(LlamaCppConfig(parallel=1, n_ctx=256), SYSTEM, cpu)
    await e.start()
    try:
        long = [MSGS[0], {"role": "user", "content": "word " * 400}]
        with pytest.raises(LLMError, match="context is full"):
            await _reply(e, long, "long")
        assert (await _reply(e, MSGS, "short")).strip()
    finally:
        await e.close()


async def test_replies_can_always_be_spoken(llama: LlamaCppEngine) -> None:
    """Asked for emoji, SmolLM2 answered with nothing else in 4 of 5 tries (the avatar said nothing): the
    sampler bans pictograph tokens, so every reply has words."""
    import re

    pictograph = re.compile("[\U0001f000-\U0001ffff\u2600-\u27bf\u2b00-\u2bff\ufe0f]")
    system = {"role": "system", "content": "You are a friendly assistant."}
    for _ in range(5):
        reply = "".join([d async for d in llama.stream([system, {"role": "user", "content": "Use emoji to show me how you feel."}],
                                                      max_tokens=24, temperature=0.7)])
        assert not pictograph.search(reply) and re.search(r"\w", reply), reply


async def test_a_requantized_model_is_made_once_and_remade_when_its_source_changes(tmp_path: Path) -> None:
    from avatarchat.engines.llm.runtime import ensure_backends
    from avatarchat.models import requantized

    ensure_backends()
    src = tmp_path / "smol.gguf"
    shutil.copyfile(default_model_path(), src)
    out = requantized(src, "q8_0", cache=tmp_path)
    assert out.name == "smol.q8_0.gguf" and out.stat().st_size > src.stat().st_size  # 8 bits a weight, not ~4.5
    made = out.stat().st_mtime_ns
    assert requantized(src, "q8_0", cache=tmp_path) == out and out.stat().st_mtime_ns == made  # kept
    os.utime(src, ns=(made + 10**9, made + 10**9))  # the source changed
    assert requantized(src, "q8_0", cache=tmp_path).stat().st_mtime_ns != made
    q4 = requantized(src, "q4_0", cache=tmp_path)
    assert q4.stat().st_size < src.stat().st_size and not list(tmp_path.glob("models/requantized/.*.tmp"))
    # The engine loads the converted file and still answers.
    engine = LlamaCppEngine(LlamaCppConfig(model_path=str(src), requantize="q8_0", parallel=1), "You are helpful.")
    await engine.start()
    try:
        conversation.set("q8")
        text = "".join([t async for t in engine.stream([{"role": "user", "content": "Say hello."}], max_tokens=8,
                                                      temperature=0.0)])
        assert text.strip()
    finally:
        await engine.close()


def test_a_model_that_cannot_be_converted_is_a_clear_error(tmp_path: Path) -> None:
    from avatarchat.engines.llm.runtime import ensure_backends
    from avatarchat.models import ModelFileError, requantized

    ensure_backends()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelFileError, match="could not convert bad.gguf to q4_0"):
        requantized(bad, "q4_0", cache=tmp_path)
    assert not list((tmp_path / "models" / "requantized").glob("*"))


def test_a_pictograph_split_across_tokens_cannot_be_completed(llama: LlamaCppEngine) -> None:
    """CI once got "❤" as "\\xe2" then "\\x9d\\xa4": after a bare lead byte, the rest of a pictograph is banned."""
    import re

    pictograph = re.compile("[\U0001f000-\U0001ffff\u2600-\u27bf\u2b00-\u2bff\ufe0f]")
    banned = llama._completions[b"\xe2"]
    completes = 0
    for tok in range(llama._n_vocab):
        piece = llama._piece(tok)
        if not piece or not 0x80 <= piece[0] <= 0xBF:
            continue  # only a continuation byte can complete a pending lead
        # E2 98..9E and E2 AC..AD begin U+2600-27BF and U+2B00-2B7F: pictographs, whatever follows.
        assert (tok in banned) == (piece[0] in range(0x98, 0x9F) or piece[0] in (0xAC, 0xAD)), (tok, piece)
        first = (b"\xe2" + piece).decode("utf-8", "replace")[0]
        if tok in banned and first != "\ufffd":
            assert pictograph.match(first), (tok, piece)
            completes += 1
    assert banned and completes  # this vocabulary does split pictographs so, and the ban catches it
