"""Does the auto profile's LLM answer in the language it was asked in, after a turn in the other one?

Each question follows one exchange in the other language (the case that failed: Qwen 0.5B kept the
history's language). Every question is asked with and without ``llm.language_cue`` in the same run, at
the profile's own temperature, and the reply counts as right when its script matches the question's.

    .venv/bin/python bench/bench_language_cue.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import platform

from avatarchat.config import load_settings
from avatarchat.engines.registry import LLM_ENGINES
from avatarchat.pipeline.history import script_language, with_language_cue

EN = ["What is your favorite color?", "Can you tell me about the moon?", "How do I make tea?",
      "What time is it in Paris?", "Do you like music?", "Where should I travel this summer?",
      "What is a good breakfast?", "How far is the sun?", "Tell me a fun fact about cats.",
      "Why is the sky blue?", "What do you do for fun?", "How can I sleep better?"]
ZH = ["你喜欢什么颜色？", "月亮有多远？", "怎么泡茶？", "北京有什么好玩的地方？", "你会说英语吗？",
      "今天天气怎么样？", "猫为什么喜欢睡觉？", "怎样才能睡得更好？", "天空为什么是蓝色的？", "推荐一本好书吧。"]
BEFORE = {"en": ("请问上海有什么好吃的？", "上海有很多好吃的，比如小笼包和生煎包。"),
          "zh": ("What is your favorite color?", "My favorite color is blue.")}


def reply_language(text: str) -> str:
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    s = load_settings(profile="auto")
    llm = LLM_ENGINES["llama_cpp"](s, None)
    await llm.start()
    wrong = {False: 0, True: 0}
    asked = 0
    for _ in range(args.rounds):
        for question in EN + ZH:
            lang = script_language(question)
            q0, a0 = BEFORE[lang]
            asked += 1
            for cue in (False, True):
                messages = [{"role": "system", "content": s.llm.system_prompt},
                            {"role": "user", "content": q0}, {"role": "assistant", "content": a0},
                            {"role": "user", "content": with_language_cue(question) if cue else question}]
                reply = ""
                async for piece in llm.stream(messages, max_tokens=48, temperature=s.llm.temperature):
                    reply += piece
                miss = reply_language(reply) != lang
                wrong[cue] += miss
                print(f"{'cue ' if cue else 'none'} {question!r} -> {reply.strip()[:70]!r}{'  WRONG' if miss else ''}")
    print(f"\nmachine: {platform.machine()}, cores: {__import__('os').cpu_count()}")
    print(f"questions: {asked} (after one exchange in the other language), temperature {s.llm.temperature}")
    print(f"answered in the wrong language: without cue {wrong[False]}/{asked}, with cue {wrong[True]}/{asked}")


if __name__ == "__main__":
    asyncio.run(main())
