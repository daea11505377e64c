"""The echo check: the avatar's own voice coming back through the microphone is told from a person talking."""

from __future__ import annotations

import numpy as np
import pytest

from avatarchat.config import ASRConfig, VoiceConfig
from avatarchat.engines.asr.whisper import WhisperEngine
from avatarchat.pipeline.echo import (
    HOP, HOP_MS, EchoCheck, EchoReference, PlaybackClock, band_energy, own_words_share,
)
from avatarchat.pipeline.voice import _SURE, OWN_WORDS
from tests.support.echo_room import room_response
from tests.support.speech import RATE, espeak_16k, piper_16k

THRESHOLD = VoiceConfig().echo_threshold
REPLY = ("Once upon a time there was a brave knight who lived in a castle by the sea. "
         "Every morning he rode his horse along the beach and watched the waves.")
LEAD_S = 1.0  # the mic runs this long before the reply starts playing


def room(audio: np.ndarray, delay_ms: float, gain_db: float, rt60_s: float, seed: int = 0) -> np.ndarray:
    wet = np.convolve(audio, room_response(rt60_s, seed))[: len(audio)]
    return np.concatenate([np.zeros(round(delay_ms * RATE / 1000)), wet])[: len(audio)] * 10 ** (gain_db / 20)


@pytest.fixture(scope="module")
def reply() -> tuple[np.ndarray, EchoReference]:
    audio = piper_16k(REPLY)
    ref = EchoReference()
    ref.add(band_energy(audio), 0)
    return np.concatenate([np.zeros(round(LEAD_S * RATE)), audio, np.zeros(RATE)]), ref


def check(mic: np.ndarray, ref: EchoReference, t: float, echo: EchoCheck) -> float | None:
    """The check at ``t`` s of the mic, playback having started at LEAD_S and run without a stall."""
    window = mic[max(0, round((t - 2.0) * RATE)) : round(t * RATE)]
    bands = band_energy(window)
    ends = round(t * RATE) - len(window) + HOP * np.arange(1, len(bands) + 1)
    return echo.unexplained(bands, ref, (ends / RATE - LEAD_S) * 1000)


def test_band_energy_has_a_frame_per_16_ms_at_any_rate() -> None:
    tone = np.sin(2 * np.pi * 1000 * np.arange(RATE) / RATE).astype(np.float32)
    bands = band_energy(tone)
    assert bands.shape == (RATE // HOP, 10) and HOP_MS == 16
    assert np.argmax(bands[5]) == np.argmax(band_energy(np.sin(2 * np.pi * 1000 * np.arange(24000) / 24000), 24000)[5])
    assert band_energy(np.zeros(100)).shape == (0, 10)


def test_the_reference_places_each_piece_at_its_start() -> None:
    ref = EchoReference()
    ref.add(np.ones((10, 10), np.float32), 0)
    ref.add(2 * np.ones((5, 10), np.float32), 320)  # at frame 20: frames 10-19 are silence
    w = ref.window(-2, 30)
    assert w.shape == (32, 10)
    assert (w[:2] == 0).all() and (w[2:12] == 1).all() and (w[12:22] == 0).all() and (w[22:27] == 2).all()
    assert (w[27:] == 0).all()


@pytest.mark.parametrize(("delay_ms", "gain_db", "rt60_s"), [(30, -3, 0.15), (150, -12, 0.4), (300, -6, 0.3)])
def test_the_avatars_voice_through_a_room_is_explained(reply, delay_ms: float, gain_db: float, rt60_s: float) -> None:  # type: ignore[no-untyped-def]
    timeline, ref = reply
    mic = room(timeline, delay_ms, gain_db, rt60_s) + 1e-4 * np.random.default_rng(0).standard_normal(len(timeline))
    echo = EchoCheck()
    loud = 10 ** (gain_db / 20) * 0.3 * np.sqrt((timeline**2).mean())
    checked = []
    for t in np.arange(LEAD_S + 1.3, LEAD_S + len(piper_16k(REPLY)) / RATE, 0.064):
        if np.sqrt((mic[round((t - 0.3) * RATE) : round(t * RATE)] ** 2).mean()) < loud:
            continue  # only while it sounds like speech: the check runs on voiced audio
        u = check(mic, ref, t, echo)
        assert u is not None and u < THRESHOLD, (t, u)
        checked.append(u)
    assert len(checked) > 20 and np.median(checked) < 0.35
    assert echo.path is not None and abs(echo.path.lag * HOP_MS - delay_ms) <= 48  # it found the delay


@pytest.mark.parametrize("voice", ["piper", "espeak"])
@pytest.mark.parametrize("with_echo", [False, True])
def test_a_person_talking_is_not_explained_even_over_the_echo(reply, voice: str, with_echo: bool) -> None:  # type: ignore[no-untyped-def]
    timeline, ref = reply
    question = "Stop, tell me about the sun instead."
    speech = piper_16k(question) if voice == "piper" else espeak_16k(question)
    at = LEAD_S + 2.5
    mic = 1e-4 * np.random.default_rng(1).standard_normal(len(timeline))
    if with_echo:
        mic += room(timeline, 120, -12, 0.3)
    mic[round(at * RATE) : round(at * RATE) + len(speech)] += 0.5 * speech[: len(mic) - round(at * RATE)]
    onset = at + int(np.argmax(np.abs(speech) > 0.02)) / RATE
    # Checked as the server does from confirmation on (every 64 ms): it is the person within 0.5 s of speaking.
    found = [t for t in np.arange(onset + 0.25, onset + 0.75, 0.064) if (check(mic, ref, t, EchoCheck()) or 0) >= THRESHOLD]
    assert found and found[0] - onset <= 0.5, found


def test_early_in_a_reply_the_check_waits_or_uses_the_known_path(reply) -> None:  # type: ignore[no-untyped-def]
    timeline, ref = reply
    mic = room(timeline, 100, -6, 0.3)
    fresh = EchoCheck()
    early = [check(mic, ref, t, fresh) for t in np.arange(LEAD_S + 0.35, LEAD_S + 0.8, 0.064)]
    assert all(u is None or u < THRESHOLD for u in early), early  # unknown or echo: never a barge-in
    known = EchoCheck()
    for t in np.arange(LEAD_S + 2.0, LEAD_S + 5.0, 0.064):  # learnt later in the reply (or in an earlier one)
        check(mic, ref, t, known)
    assert known.path is not None
    seen = [check(mic, ref, t, known) or 0.0 for t in np.arange(LEAD_S + 0.35, LEAD_S + 0.8, 0.064)]
    # Never sure it is the person (voice.py interrupts at once only then). Piper's speech differs from run to run,
    # and in ~1 run in 8 this early echo stays just over the threshold for two checks (0.72-0.78 in 20 runs, max):
    # voice.py then asks the transcript veto (tests/test_voice.py), which hears the avatar's own words.
    assert max(seen) < _SURE, seen


def test_the_playback_clock_follows_a_stalled_and_resumed_player() -> None:
    clock = PlaybackClock()
    assert not clock
    # Reported every 100 ms (1600 samples): played, stalled at 150 ms, waited, resumed.
    for mic, pos, playing in [(1600, 100, True), (3200, 150, False), (4800, 150, False), (6400, 200, True)]:
        clock.report(mic, pos, playing)
    at = clock.positions(np.array([0, 1600, 2400, 3200, 4000, 4800, 5600, 6400, 8000]))
    assert list(at) == [0, 100, 150, 150, 150, 150, 150, 200, 300]
    assert clock.known_until(9000) == 9000
    clock.report(9600, 300, False)
    assert clock.known_until(10000) == 9600  # after a stalled report, it may have resumed at any moment
    clock.report(100, 0, True)  # the microphone restarted: earlier reports no longer apply
    assert list(clock.positions(np.array([100, 1700]))) == [0, 100]


def test_own_words_share_counts_the_telling_words() -> None:
    said = "Once upon a time there was a brave knight who lived in a castle by the sea."
    assert own_words_share("there was a brave night who lived in a castle", said) == 1.0  # an ASR slip
    assert own_words_share("Stop, tell me about the sun instead.", said) == 0.0
    assert own_words_share("Tell me more about the knight.", said) < OWN_WORDS  # words of its own: the person's
    assert own_words_share("Why is the sea salty?", said) < OWN_WORDS
    # A mishearing of the person ("France" as "brand") is not the avatar's "and".
    assert own_words_share("What is the capital of your brand?", said + " He rode along the beach and") == 0.0
    assert own_words_share("", said) is None and own_words_share("Oh, the...", said) is None  # no evidence
    assert own_words_share("从前有一个勇敢的骑士", "从前有一个勇敢的骑士住在海边的城堡里。") == 1.0
    assert own_words_share("今天天气怎么样", "从前有一个勇敢的骑士住在海边的城堡里。") < 0.3


@pytest.fixture(scope="module")
def asr() -> WhisperEngine:
    engine = WhisperEngine(ASRConfig())
    engine.load()
    return engine


def test_a_transcript_tells_the_avatars_words_from_the_persons(asr, reply) -> None:  # type: ignore[no-untyped-def]
    """What the unsure echo checks fall back on: Whisper on 2 s of the microphone, against the avatar's sentences."""
    timeline, _ = reply
    echoes = []
    for delay_ms, gain_db, rt60_s in [(60, -6, 0.2), (200, -3, 0.5), (120, -12, 0.4)]:
        mic = room(timeline, delay_ms, gain_db, rt60_s)
        for t in np.arange(LEAD_S + 1.0, LEAD_S + 7.0, 0.5):  # the echo alone, along the reply
            echoes.append(own_words_share(asr.transcribe(mic[round((t - 2) * RATE) : round(t * RATE)]), REPLY))
    # Whisper garbles a reverberant echo ("a great night who looked in a cast"): most, not all, are known.
    assert sum(s is not None and s < OWN_WORDS for s in echoes) <= 2, echoes
    for question in ("Wait, what is the capital of France?", "Tell me more about the knight.", "Why is the sea salty?"):
        voice = piper_16k(question)
        at = round((LEAD_S + 2.5) * RATE)
        mixed = room(timeline, 120, -6, 0.3)
        mixed[at : at + len(voice)] += voice
        heard = asr.transcribe(mixed[at + len(voice) - 2 * RATE : at + len(voice)])
        assert own_words_share(heard, REPLY) < OWN_WORDS, heard  # the person, over the echo
