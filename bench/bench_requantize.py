"""The embedded LLMs as packaged and re-quantized (``llm.llama_cpp.requantize``): speed and quality.

For each model file, in its own process, through the engine the server uses: the first token and
decoding speed of one reply (median of ``--runs``) and of 4 at once, on 1 and on 2 threads (each in a
fresh process, as the server has one engine); and the
perplexity of the same file on English text (README.md) and on Mandarin sentences (the ASR and voice
benches' sentences, none written for this), as the quality cost of the conversion.

    .venv/bin/python bench/bench_requantize.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, machine  # noqa: E402

CHILD = r"""
import asyncio, json, math, re, statistics, sys, time
import numpy as np
from avatarchat.config import LlamaCppConfig
from avatarchat.engines.llm.base import conversation
from avatarchat.engines.llm.llama_cpp import LlamaCppEngine, default_model_path
from avatarchat.engines.llm.runtime import ensure_backends
from avatarchat.models import requantized

model, kind, what, runs, en_text, zh_text = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
ensure_backends()
src = default_model_path(model)
path = src if kind == "none" else requantized(src, kind)
question = "给我讲一个关于大海的长故事。" if model.startswith("qwen") else "Tell me a long story about the sea."

async def reply(e, who, n):
    conversation.set(who)
    k, first, t = 0, None, time.perf_counter()
    async for _ in e.stream([{"role": "user", "content": question}], max_tokens=n, temperature=0.0):
        k += 1
        first = first or time.perf_counter() - t
    return k, first, time.perf_counter() - t

async def speed(threads):
    e = LlamaCppEngine(LlamaCppConfig(model_path=str(path), n_threads=threads, n_threads_batch=threads), "You are helpful.")
    await e.start()
    first, one, four = [], [], []
    for r in range(runs):
        k, f, total = await reply(e, f"a{r}", 48)
        first.append(f * 1000)
        one.append((k - 1) / (total - f))
        t = time.perf_counter()
        done = await asyncio.gather(*(reply(e, f"b{r}{i}", 48) for i in range(4)))
        four.append(sum(d[0] for d in done) / (time.perf_counter() - t))
    await e.close()
    return {"first_token_ms": statistics.median(first), "decode1_tok_s": statistics.median(one),
            "decode4_tok_s": statistics.median(four)}

def perplexity(text):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    toks = llm.tokenize(text.encode(), add_bos=False)[:1600]
    nll, n = 0.0, 0
    for s in range(0, max(1, len(toks) - 64), 400):
        chunk = toks[s:s + 400]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)])
        for i in range(16, len(chunk) - 1):  # each chunk's first tokens have no context
            row = logits[i]
            m = row.max()
            nll += m + math.log(np.exp(row - m).sum()) - row[chunk[i + 1]]
            n += 1
    return math.exp(nll / n)

if what == "ppl":
    out = {"file": path.name, "bytes": path.stat().st_size, "ppl_en": perplexity(en_text), "ppl_zh": perplexity(zh_text)}
else:
    out = {what: asyncio.run(speed(int(what[-1])))}
print(json.dumps(out))
"""

ROOT = Path(__file__).resolve().parent.parent
CASES = [("smollm2-135m", "none"), ("smollm2-135m", "q8_0"), ("smollm2-135m", "q4_0"),
         ("qwen2.5-coder-0.5b", "none"), ("qwen2.5-coder-0.5b", "q4_0")]


def texts() -> tuple[str, str]:
    import re

    from bench_asr_zh import SENTENCES
    from bench_language_cue import ZH
    from bench_voice_zh import QUESTIONS

    en = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    en = " ".join(re.sub(r"[#*|`>\-]+", " ", en).split())
    zh = "".join(s for s in [*SENTENCES, *QUESTIONS, *ZH])
    return en, zh


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    en, zh = texts()
    results = {}
    for model, kind in CASES:
        r: dict = {}
        # One process per measurement: a second engine in the same process inherits the first one's
        # OpenMP thread pool, and two threads then ran at half the speed of one.
        for what in ("threads1", "threads2", "ppl"):
            proc = subprocess.run([sys.executable, "-c", CHILD, model, kind, what, str(args.runs), en, zh],
                                  capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                print(f"{model} {kind} {what}: failed\n{proc.stderr[-2000:]}")
                break
            r.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            results[f"{model}/{kind}"] = r
        if f"{model}/{kind}" not in results:
            continue
        base = results.get(f"{model}/none", r)
        t1, t2 = r["threads1"], r["threads2"]
        print(f"{model:20} {kind:5} {r['bytes'] / 2**20:5.0f} MB  1 thread: first {t1['first_token_ms']:4.0f} ms, "
              f"{t1['decode1_tok_s']:5.1f} tok/s ({t1['decode1_tok_s'] / base['threads1']['decode1_tok_s']:.2f}x), "
              f"4 at once {t1['decode4_tok_s']:5.1f}  |  2 threads: first {t2['first_token_ms']:4.0f} ms, "
              f"{t2['decode1_tok_s']:5.1f} tok/s ({t2['decode1_tok_s'] / base['threads2']['decode1_tok_s']:.2f}x), "
              f"4 at once {t2['decode4_tok_s']:5.1f}  |  perplexity en {r['ppl_en']:.1f} "
              f"({r['ppl_en'] / base['ppl_en'] - 1:+.1%}), zh {r['ppl_zh']:.1f} ({r['ppl_zh'] / base['ppl_zh'] - 1:+.1%})",
              flush=True)
    dump("requantize", results)


if __name__ == "__main__":
    main()
