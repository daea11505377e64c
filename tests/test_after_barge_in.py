"""After a barge-in the embedded LLM answers the new question, not the one it was interrupted in."""

from __future__ import annotations

import asyncio

import pytest

from avatarchat.config import LlamaCppConfig, Settings
from avatarchat.engines.llm.base import conversation
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine
from avatarchat.pipeline.scheduler import CpuScheduler
from tests.support.barge_in_cases import CASES, answers_new, prompt


@pytest.fixture(scope="module")
async def llm() -> LlamaCppEngine:
    cpu = CpuScheduler(2)
    e = LlamaCppEngine(LlamaCppConfig(parallel=2), Settings().llm.system_prompt, cpu)
    await e.start()
    yield e
    await e.close()
    cpu.close()


async def _greedy(llm: LlamaCppEngine, messages: list[dict[str, str]], who: str) -> str:
    async def run() -> str:
        conversation.set(who)
        return "".join([d async for d in llm.stream(messages, max_tokens=48, temperature=0.0)])

    return await asyncio.create_task(run())


async def test_the_reply_after_a_barge_in_answers_the_new_question(llm: LlamaCppEngine) -> None:
    system = Settings().llm.system_prompt
    replies = [await _greedy(llm, prompt(system, case, interrupted=True), f"case{i}") for i, case in enumerate(CASES)]
    on_topic = [answers_new(r, case[3], case[4]) for r, case in zip(replies, CASES)]
    # A 135M model: one miss in six is allowed; with the interrupted exchange in the prompt it misses more.
    assert sum(on_topic) >= len(CASES) - 1, list(zip(on_topic, replies))
