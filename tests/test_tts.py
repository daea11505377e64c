import gc
import shutil
import sys
import threading
import time
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


class _Recording:
    """An onnxruntime session that records its runs, and makes two runs meet before either goes on."""

    def __init__(self, session: object, name: str, used: list[str], meet: threading.Barrier | None) -> None:
        self._session, self._name, self._used, self._meet = session, name, used, meet

    def run(self, *args: object, **kwargs: object) -> object:
        self._used.append(self._name)
        if self._meet is not None:
            self._meet.wait()  # both syntheses are inside the voice model at once, or this times out
        return self._session.run(*args, **kwargs)  # type: ignore[attr-defined]


def test_piper_synthesizes_in_parallel_with_one_thread_each_beside_other_work(piper: PiperEngine) -> None:
    """Only espeak-ng's phonemizing is one text at a time: two pieces run the voice model at the same time, and
    inside the CPU scheduler, while other work waits for a core, with the voice's one-thread session."""
    from avatarchat.pipeline.scheduler import CpuScheduler

    assert piper._voice is not None and piper._single is not None
    voice, single = piper._voice.session, piper._single
    used: list[str] = []
    meet = threading.Barrier(2, timeout=10)
    piper._voice.session = _Recording(voice, "all", used, meet)
    piper._single = _Recording(single, "single", used, meet)
    cpu = CpuScheduler(2)
    release = threading.Event()
    for _ in range(2):  # both cores busy until every unit below is queued
        cpu.submit(release.wait, 30, kind="render")
    try:
        texts = ["The sea is wide and deep today.", "Ask me anything you like."]
        later = cpu.submit(time.sleep, 0, kind="render", deadline=time.perf_counter() + 60)  # waits for a core
        futures = [cpu.submit(piper.synthesize, t, kind="tts", deadline=time.perf_counter()) for t in texts]
        release.set()
        speeches = [f.result(timeout=30) for f in futures]
        assert used == ["single", "single"]  # other work waited for a core meanwhile
        later.result(timeout=10)
        for speech, text in zip(speeches, texts):
            assert speech.text == text and speech.duration > 1.0 and speech.phonemes
        # Alone, outside the scheduler: the session with every thread.
        used.clear()
        piper._voice.session = _Recording(voice, "all", used, None)
        piper._single = _Recording(single, "single", used, None)
        assert piper.synthesize("Hello.").duration > 0.2 and used == ["all"]
    finally:
        piper._voice.session, piper._single = voice, single
        release.set()
        cpu.close()
