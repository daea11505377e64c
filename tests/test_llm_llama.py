import asyncio

import pytest

from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import LLMError
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine, default_model_path

MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
async def llama() -> LlamaCppEngine:
    e = LlamaCppEngine(LlamaCppConfig(), "Answer briefly.")
    await e.start()
    yield e
    await e.close()


def test_model_file_is_the_packaged_gguf() -> None:
    p = default_model_path()
    assert p.is_file() and p.suffix == ".gguf" and p.stat().st_size > 50_000_000


async def test_streams_text(llama: LlamaCppEngine) -> None:
    text = "".join([d async for d in llama.stream(MSGS, max_tokens=24, temperature=0.0)])
    assert len(text.strip()) > 0
    assert llama.count_tokens("hello world") >= 2


async def test_cancel_stops_generation_and_the_next_request_works(llama: LlamaCppEngine) -> None:
    stream = llama.stream(MSGS, max_tokens=200, temperature=0.0)
    first = await anext(stream)
    await stream.aclose()
    assert first
    # The single worker is free again soon: a new request streams normally.
    text = await asyncio.wait_for(
        asyncio.create_task(_collect(llama)), timeout=30
    )
    assert text.strip()
    assert len(llama._worker._threads) == 1  # still the one generation thread, none leaked


async def _collect(llama: LlamaCppEngine) -> str:
    return "".join([d async for d in llama.stream(MSGS, max_tokens=8, temperature=0.0)])


async def test_missing_model_file() -> None:
    e = LlamaCppEngine(LlamaCppConfig(model_path="/nonexistent/model.gguf"))
    with pytest.raises(LLMError, match="not found"):
        await e.start()
    await e.close()


def test_shifted_reuse_finds_the_trimmed_block() -> None:
    from avatarchat.engines.llm.llama_cpp import shifted_reuse

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


async def test_trimmed_history_reuses_the_kv_cache(llama: LlamaCppEngine) -> None:
    """After the oldest turn is dropped, only the new suffix is evaluated: the prompt is not re-read."""
    history = [{"role": "system", "content": "You are terse."}]
    for i in range(6):
        history += [{"role": "user", "content": f"Question number {i} about the sea and the sky?"},
                    {"role": "assistant", "content": f"Answer number {i}: the sea is wide and the sky is high."}]
    full = history + [{"role": "user", "content": "And the moon?"}]
    async for _ in llama.stream(full, max_tokens=4, temperature=0.0):
        pass
    before = llama._llm.n_tokens
    trimmed = [history[0]] + history[3:] + [{"role": "user", "content": "And the moon?"}]
    tokens = llama._tokens(trimmed)
    llama._reuse_kv(tokens)
    assert llama._llm.n_tokens < before
    kept = llama._llm.input_ids[: llama._llm.n_tokens].tolist()
    same = next((i for i, (x, y) in enumerate(zip(kept, tokens)) if x != y), len(kept))
    assert same > 0.8 * len(tokens) - 12  # the cache holds nearly all of the trimmed prompt
    out = "".join([d async for d in llama.stream(trimmed, max_tokens=8, temperature=0.0)])
    assert out.strip()


async def test_prefill_leaves_only_the_new_words_to_evaluate(llama: LlamaCppEngine) -> None:
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there."},
               {"role": "assistant", "content": "Hello! How can I help?"}]
    await llama.prefill(history)
    nxt = llama._tokens(history + [{"role": "user", "content": "Name a colour."}])
    cached = llama._llm.input_ids[: llama._llm.n_tokens].tolist()
    assert llama._llm.n_tokens > 10 and nxt[: len(cached)] == cached
    assert len(nxt) - len(cached) < 15  # the person's words and the assistant header
    out = "".join([d async for d in llama.stream(history + [{"role": "user", "content": "Name a colour."}],
                                                 max_tokens=8, temperature=0.0)])
    assert out.strip()
    await llama.prefill(history)  # idempotent: nothing left to evaluate
