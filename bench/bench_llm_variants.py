"""The embedded LLM on each CPU variant of the portable llama.cpp build (issue 12).

The set-up builds every x86-64 variant and the engine loads the best for the CPU; this measures what
that choice is worth against the AVX2 baseline (``haswell``) and plain x86-64 (``x64``), on this CPU,
in the same run: prompt evaluation (tokens/s) and decoding (tokens/s, one reply and 4 at once), through
the engine the server uses. Each variant runs in its own process (AVATARCHAT_LLAMA_CPU_VARIANT).

    .venv/bin/python bench/bench_llm_variants.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, machine  # noqa: E402

CHILD = r"""
import asyncio, json, sys, time
from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import conversation
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine
from avatarchat.engines.llm.runtime import ensure_backends

RUNS = int(sys.argv[1])
LONG = "Here is some context about the sea, the sky and the land. " * 12

async def reply(e, who, text, n):
    conversation.set(who)
    k = 0
    async for _ in e.stream([{"role": "user", "content": text}], max_tokens=n, temperature=0.0):
        k += 1
    return k

async def main():
    e = LlamaCppEngine(LlamaCppConfig(), "You are helpful.")
    await e.start()
    out = {"variant": ensure_backends().loaded, "prompt": [], "decode1": [], "decode4": []}
    for r in range(RUNS):
        before, t = e.prompt_tokens, time.perf_counter()
        await asyncio.create_task(reply(e, f"p{r}", LONG + str(r), 1))
        out["prompt"].append((e.prompt_tokens - before) / (time.perf_counter() - t))
        t = time.perf_counter()
        n1 = await asyncio.create_task(reply(e, f"d{r}", "Tell me a long story.", 64))
        out["decode1"].append(n1 / (time.perf_counter() - t))
        t = time.perf_counter()
        n = await asyncio.gather(*(asyncio.create_task(reply(e, f"b{r}{i}", f"Story {i}, please.", 64)) for i in range(4)))
        out["decode4"].append(sum(n) / (time.perf_counter() - t))
    await e.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=["best", "haswell", "x64"])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    results = {}
    for variant in args.variants:
        env = dict(os.environ)
        if variant != "best":
            env["AVATARCHAT_LLAMA_CPU_VARIANT"] = variant
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.runs)], capture_output=True, text=True, env=env,
                              timeout=900)
        if proc.returncode != 0:
            print(f"{variant}: failed: {proc.stderr[-500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        name = f"{variant} ({r['variant']})" if variant == "best" else variant
        results[name] = {k: statistics.median(v) for k, v in r.items() if k != "variant"}
    base = next(iter(results.values()))
    for name, r in results.items():
        print(f"{name:16} prompt {r['prompt']:6.0f} tok/s   decode {r['decode1']:5.1f} tok/s   "
              f"4 replies at once {r['decode4']:6.1f} tok/s   (× best: {r['prompt'] / base['prompt']:.2f}, "
              f"{r['decode1'] / base['decode1']:.2f}, {r['decode4'] / base['decode4']:.2f})")
    dump("llm_variants", {"runs": args.runs, "medians": results})


if __name__ == "__main__":
    main()
