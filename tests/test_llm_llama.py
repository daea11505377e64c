import asyncio
import threading

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
    assert sum(t.name.startswith("llm") for t in threading.enumerate()) <= 1


async def _collect(llama: LlamaCppEngine) -> str:
    return "".join([d async for d in llama.stream(MSGS, max_tokens=8, temperature=0.0)])


async def test_missing_model_file() -> None:
    e = LlamaCppEngine(LlamaCppConfig(model_path="/nonexistent/model.gguf"))
    with pytest.raises(LLMError, match="not found"):
        await e.start()
    await e.close()
