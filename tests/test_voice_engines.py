"""VAD, ASR and turn-taking on real speech (Piper and espeak-ng), noise and silence."""

from __future__ import annotations

import numpy as np
import pytest

from avatarchat.config import ASRConfig, VADConfig, VoiceConfig
from avatarchat.engines.asr.base import ASRError
from avatarchat.engines.asr.queue import FINAL, PARTIAL, ASRQueue
from avatarchat.engines.asr.whisper import WhisperEngine
from avatarchat.engines.vad.silero import SileroVAD, VADError
from avatarchat.pipeline.turn_taking import EndOfTurn, Partial, Resumed, SpeechStart, Speculate, State, TurnTaker
from tests.support.speech import espeak_16k, piper_16k, silence, word_match

UTTERANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    v = SileroVAD(VADConfig())
    v.load()
    return v


@pytest.fixture(scope="module")
def asr() -> WhisperEngine:
    engine = WhisperEngine(ASRConfig())
    engine.load()
    return engine


def taker(vad: SileroVAD, **voice: object) -> TurnTaker:
    return TurnTaker(vad.stream(), VADConfig(), VoiceConfig(**voice), partial_interval_ms=800)  # type: ignore[arg-type]


def run(t: TurnTaker, audio: np.ndarray, chunk: int = 320) -> list[tuple[float, object]]:
    """Feed in odd-sized chunks (the VAD window is 512); returns (seconds into the audio, event)."""
    out = []
    for pos in range(0, len(audio), chunk):
        for e in t.push(audio[pos : pos + chunk]):
            out.append(((pos + chunk) / 16000, e))
    return out


def test_vad_hears_speech_not_silence_or_noise(vad: SileroVAD) -> None:
    s = vad.stream()
    speech = s.push(piper_16k(UTTERANCE))
    assert len(speech) == len(piper_16k(UTTERANCE)) // 512
    assert np.mean(np.array(speech) > 0.5) > 0.5
    s.reset()
    assert max(s.push(silence(1.0))) < 0.2
    rng = np.random.default_rng(1)
    s.reset()
    assert np.mean(np.array(s.push((0.3 * rng.standard_normal(32000)).astype(np.float32))) > 0.5) < 0.1
    t = np.arange(32000) / 16000
    s.reset()
    assert np.mean(np.array(s.push((0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))) > 0.5) < 0.1


def test_vad_streams_are_independent(vad: SileroVAD) -> None:
    a, b = vad.stream(), vad.stream()
    audio = piper_16k(UTTERANCE)
    whole = a.push(audio)
    parts = b.push(audio[:1000]) + b.push(audio[1000:5000]) + b.push(audio[5000:])
    assert np.allclose(whole, parts, atol=1e-5)


def test_vad_reports_a_missing_model() -> None:
    v = SileroVAD(VADConfig(model_path="/nonexistent/silero.onnx"))
    with pytest.raises(Exception):
        v.load()
    with pytest.raises(VADError):
        SileroVAD(VADConfig()).stream()


def test_turn_taking_on_an_utterance(vad: SileroVAD) -> None:
    speech = piper_16k("Hello there, can you tell me a story about the sea?")
    audio = np.concatenate([silence(0.5), speech, silence(1.0)])
    # Piper's trailing breath varies from voice run to run, so time the end from the last window
    # the VAD itself calls voiced (p >= neg_threshold), which is what the turn-taker counts from.
    probs = vad.stream().push(audio)
    last_voiced = max(i for i, p in enumerate(probs) if p >= VADConfig().neg_threshold)
    speech_end = (last_voiced + 1) * 512 / 16000
    events = run(taker(vad), audio)
    kinds = [type(e) for _, e in events]
    assert kinds[0] is SpeechStart and kinds[-1] is EndOfTurn
    assert kinds.count(EndOfTurn) == 1 and kinds.count(SpeechStart) == 1
    assert Partial in kinds  # the utterance is long enough for a partial transcript
    start_at = next(t for t, e in events if isinstance(e, SpeechStart))
    assert 0.5 < start_at < 0.5 + 0.6  # confirmed ~250 ms after the voice begins
    spec_at = [t for t, e in events if isinstance(e, Speculate)]
    end_at, end = next((t, e) for t, e in events if isinstance(e, EndOfTurn))
    # The turn ends about silence_ms after the last voiced window, and speculation comes before it.
    assert 0.45 < end_at - speech_end < 0.6, end_at - speech_end
    assert spec_at and spec_at[-1] < end_at
    assert isinstance(end, EndOfTurn) and len(end.audio) / 16000 > 2.0


def test_a_pause_inside_an_utterance_resumes(vad: SileroVAD) -> None:
    a, b = piper_16k("I would like"), piper_16k("a cup of tea please.")
    audio = np.concatenate([a, silence(0.3), b, silence(0.9)])
    kinds = [type(e) for _, e in run(taker(vad), audio)]
    # Speculation started in the pause, was dropped when speech resumed, and one turn came out.
    assert kinds.count(Speculate) >= 2 and Resumed in kinds
    assert kinds.count(EndOfTurn) == 1 and kinds.count(SpeechStart) == 1


def test_silence_noise_and_tones_start_no_turn(vad: SileroVAD) -> None:
    rng = np.random.default_rng(7)
    t = np.arange(48000) / 16000
    for audio in (
        silence(3.0),
        (0.3 * rng.standard_normal(48000)).astype(np.float32),
        (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32),
        (0.5 * np.sign(np.sin(2 * np.pi * 200 * t))).astype(np.float32),
    ):
        tk = taker(vad)
        assert run(tk, audio) == []
        assert tk.state in (State.SILENT, State.PENDING)


def test_echo_guard_needs_longer_speech(vad: SileroVAD) -> None:
    short = np.concatenate([piper_16k("Yes."), silence(0.8)])
    normal = taker(vad)
    assert any(isinstance(e, SpeechStart) for _, e in run(normal, short))
    guarded = taker(vad)
    guarded.confirm_ms = 900
    assert not any(isinstance(e, SpeechStart) for _, e in run(guarded, short))


def test_max_utterance_cuts_a_monologue(vad: SileroVAD) -> None:
    long = np.concatenate([piper_16k("This is a rather long sentence that keeps going on and on.")] * 2)
    events = run(taker(vad, max_utterance_s=2.0), long)
    assert [type(e) for _, e in events].count(EndOfTurn) >= 1


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("What is the capital of France?", "piper"),
        ("Please tell me a joke about computers.", "piper"),
        ("How is the weather today?", "espeak"),
    ],
)
def test_asr_transcribes_real_speech(asr: WhisperEngine, text: str, source: str) -> None:
    audio = piper_16k(text) if source == "piper" else espeak_16k(text)
    got = asr.transcribe(np.concatenate([silence(0.2), audio, silence(0.3)]))
    assert word_match(text, got) >= 0.8, got


def test_asr_on_silence_is_empty_and_unloaded_engine_errors(asr: WhisperEngine) -> None:
    assert word_match("anything", asr.transcribe(silence(1.0))) == 0
    with pytest.raises(ASRError):
        WhisperEngine(ASRConfig()).transcribe(silence(0.5))


async def test_asr_queue_serves_finals_first_and_skips_abandoned(asr: WhisperEngine) -> None:
    import asyncio

    queue = ASRQueue(asr)
    order: list[str] = []
    audio = piper_16k(UTTERANCE)

    async def job(name: str, priority: int) -> None:
        await queue.transcribe(audio, priority)
        order.append(name)

    first = asyncio.create_task(job("busy", FINAL))
    await asyncio.sleep(0.01)  # "busy" is now on the model
    partial = asyncio.create_task(job("partial", PARTIAL))
    abandoned = asyncio.create_task(job("abandoned", PARTIAL))
    final = asyncio.create_task(job("final", FINAL))
    await asyncio.sleep(0)
    abandoned.cancel()
    await asyncio.gather(first, partial, final, abandoned, return_exceptions=True)
    assert order == ["busy", "final", "partial"]
    await queue.close()


LONG = "Please tell me a long story about a brave knight who rides out to save the village from a dragon."


def test_short_encoder_window_matches_the_stock_30s_window(asr: WhisperEngine) -> None:
    stock = WhisperEngine(ASRConfig(min_window_s=30))
    stock.load()
    for truth, audio in (
        ("Can you recommend a good movie for tonight?", piper_16k("Can you recommend a good movie for tonight?")),
        ("How is the weather today?", espeak_16k("How is the weather today?")),
        ("Tell me something interesting about octopuses.", espeak_16k("Tell me something interesting about octopuses.")),
        (LONG, piper_16k(LONG)),
    ):
        short, full = asr.transcribe(audio), stock.transcribe(audio)
        assert word_match(truth, short) >= word_match(truth, full) - 0.1, (short, full)
        assert word_match(truth, short) >= 0.6, short


def test_asr_bad_model_path_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ASRError, match="cannot load"):
        WhisperEngine(ASRConfig(model_path=str(tmp_path), language="zh")).load()
