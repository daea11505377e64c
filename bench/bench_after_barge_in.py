"""After a barge-in, does the next reply answer the new question, or go on with the interrupted one?

The embedded LLM, six conversations: a request for a long answer, the first words of the reply (what the person
heard before talking over it), then a question on another topic. A reply answers it when it has a word of the new
topic and none of the old one. The prompt as the product builds it after a barge-in (the interrupted exchange left
out) against the prompt with the interrupted exchange kept, each sampled --samples times at the product's
temperature.

    .venv/bin/python bench/bench_after_barge_in.py [--samples 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import dump, machine  # noqa: E402
from avatarchat.config import LlamaCppConfig, Settings  # noqa: E402
from avatarchat.engines.llm.base import conversation  # noqa: E402
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine  # noqa: E402
from avatarchat.pipeline.scheduler import CpuScheduler  # noqa: E402
from tests.support.barge_in_cases import CASES, answers_new, prompt  # noqa: E402

async def reply(llm: LlamaCppEngine, messages: list[dict[str, str]], who: str, temperature: float) -> str:
    async def run() -> str:
        conversation.set(who)
        return "".join([d async for d in llm.stream(messages, max_tokens=48, temperature=temperature)])

    return await asyncio.create_task(run())


async def main(samples: int) -> dict[str, object]:
    settings = Settings()
    cpu = CpuScheduler(2)
    llm = LlamaCppEngine(LlamaCppConfig(parallel=2), settings.llm.system_prompt, cpu)
    await llm.start()
    out: dict[str, object] = {}
    try:
        k = 0
        for label, interrupted in (("as built (interrupted exchange left out)", True),
                                   ("interrupted exchange kept", False)):
            ok = 0
            for case in CASES:
                for _ in range(samples):
                    k += 1
                    r = await reply(llm, prompt(settings.llm.system_prompt, case, interrupted), f"b{k}",
                                    settings.llm.temperature)
                    ok += answers_new(r, case[3], case[4])
            n = len(CASES) * samples
            print(f"{label:42s}: answers the new question {ok}/{n} ({100 * ok / n:.0f} %)", flush=True)
            out[label] = {"ok": ok, "n": n}
    finally:
        await llm.close()
        cpu.close()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    dump("after_barge_in", {"samples": args.samples, **asyncio.run(main(args.samples))})
