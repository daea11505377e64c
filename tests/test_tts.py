import gc
import shutil
import sys
import tracemalloc

import numpy as np
import pytest

from avatarchat.config import EspeakConfig, PiperConfig
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.tts.espeak import EspeakEngine
from avatarchat.engines.tts.piper import PiperEngine


@pytest.fixture(scope="module")
def piper() -> PiperEngine:
    e = PiperEngine(PiperConfig())
    e.load()
    return e


def test_piper_speaks_with_phoneme_timings(piper: PiperEngine) -> None:
    speech = piper.synthesize("Hello there, how are you today?")
    assert speech.sample_rate == 22050
    assert 1.0 < speech.duration < 4.0
    assert float(np.sqrt(np.mean(speech.audio**2))) > 0.02
    assert speech.phonemes is not None
    ends = [p.end for p in speech.phonemes]
    assert ends == sorted(ends)
    assert abs(ends[-1] - speech.duration) < 0.05
    assert "h" in [p.phoneme for p in speech.phonemes]


def test_piper_rate_changes_duration(piper: PiperEngine) -> None:
    slow = piper.synthesize("This is a test sentence.", rate=0.8).duration
    fast = piper.synthesize("This is a test sentence.", rate=1.25).duration
    assert fast < slow * 0.8


@pytest.mark.parametrize("text", ["Sure. Here is a short answer for you.", "One, two: three; four? Five! Six",
                                  "Dr. Smith's café — naïve… 3:45 pm, 1,234.5", "日本語", "", "A" * 2000])
def test_piper_phonemes_are_piper_s_own_without_its_leak(piper: PiperEngine, text: str) -> None:
    """piper-tts 1.8.0's espeakbridge.get_phonemes leaks each tuple it returns (bench/bench_soak.py found the
    growth); the engine calls espeak-ng itself instead, with the same result."""
    from piper import espeakbridge

    get = espeakbridge.get_phonemes
    ours, theirs = get(text), get.__wrapped__(text)
    assert ours == theirs
    assert [sys.getrefcount(ours[i]) for i in range(len(ours))] == [2] * len(ours)  # the list's and getrefcount's
    assert [sys.getrefcount(theirs[i]) for i in range(len(theirs))] == [3] * len(theirs)  # one too many: leaked


def test_piper_phonemizing_does_not_grow(piper: PiperEngine) -> None:
    phonemize = piper._voice.phonemize
    phonemize("Sure. Here is a short answer for you.")
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            phonemize("Sure. Here is a short answer for you.")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, grown  # was ~680 KB for 2000 pieces


def test_piper_not_loaded() -> None:
    with pytest.raises(TTSError):
        PiperEngine(PiperConfig()).synthesize("x")


def test_piper_missing_voice(tmp_path) -> None:
    with pytest.raises(TTSError, match="not found"):
        PiperEngine(PiperConfig(model_path=str(tmp_path / "v.onnx"))).load()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
@pytest.mark.parametrize("voice, text", [("en-us", "Hello from espeak."), ("cmn-latn-pinyin", "ni3 hao3, shi4 jie4")])
def test_espeak_speaks(voice: str, text: str) -> None:
    e = EspeakEngine(EspeakConfig(voice=voice))
    e.load()
    speech = e.synthesize(text)
    assert speech.phonemes is None
    assert speech.duration > 0.5
    assert float(np.abs(speech.audio).max()) > 0.1


def test_espeak_missing_binary() -> None:
    with pytest.raises(TTSError, match="not found"):
        EspeakEngine(EspeakConfig(binary="no-such-espeak")).load()
