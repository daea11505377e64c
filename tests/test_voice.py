"""Hands-free voice end to end: real speech (Piper, espeak-ng) streamed as 16 kHz PCM in real time."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect

from avatarchat import metrics
from tests.support.echo_room import SpeakerMic
from tests.support.live_app import LiveApp
from tests.support.speech import espeak_16k, feed_realtime, frame, pcm16, piper_16k, silence, word_match
from tests.support.voice_client import VoiceClient, voice_client


async def test_spoken_question_gets_a_transcript_and_a_reply(live_app: LiveApp) -> None:
    c = await voice_client(live_app)
    text = "Hello there, can you tell me what the weather is like on the moon?"
    await feed_realtime(c.ws, np.concatenate([silence(0.3), piper_16k(text)]))
    end = await feed_realtime(c.ws, silence(1.0))
    _, final = await c.wait_for("transcript", final=True)
    assert word_match(text, final["text"]) >= 0.8, final
    assert c.events("speech_start")
    partials = [e for e in c.events("transcript") if not e["final"]]
    assert partials and all(e["text"] for e in partials)  # partial transcripts while speaking
    _, start = await c.wait_for("turn_start")
    assert start["user_text"] == final["text"]
    _, done = await c.wait_for("turn_done", timeout=90)
    assert done["reason"] == "complete" and done["text"].strip()
    assert c.media_at.get(start["turn_id"])
    assert end > 0
    await c.close()


async def test_espeak_voice_is_understood_too(live_app: LiveApp) -> None:
    c = await voice_client(live_app)
    text = "Please tell me a joke about computers."
    await feed_realtime(c.ws, np.concatenate([silence(0.2), espeak_16k(text), silence(1.0)]))
    _, final = await c.wait_for("transcript", final=True)
    assert word_match(text, final["text"]) >= 0.8, final
    await c.wait_for("turn_done", timeout=90)
    await c.close()


async def test_silence_noise_and_tones_trigger_no_turn(live_app: LiveApp) -> None:
    c = await voice_client(live_app)
    rng = np.random.default_rng(3)
    t = np.arange(32000) / 16000
    await feed_realtime(c.ws, silence(1.0))
    await feed_realtime(c.ws, (0.25 * rng.standard_normal(32000)).astype(np.float32))
    await feed_realtime(c.ws, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    await feed_realtime(c.ws, silence(0.8))
    kinds = {k for _, k, _ in c.log}
    assert not kinds & {"speech_start", "transcript", "turn_start"}, kinds
    await c.close()


async def test_barge_in_cancels_the_reply_and_keeps_only_what_was_heard(live_app: LiveApp) -> None:
    c = await voice_client(live_app)
    await feed_realtime(c.ws, np.concatenate([piper_16k("Please tell me a long story about a brave knight."), silence(0.9)]))
    _, start = await c.wait_for("turn_start")
    first = start["turn_id"]
    await c.wait_for("media_start", turn_id=first)
    # The person listens for a moment, then talks over the avatar. Not longer: the embedded LLM's "long story"
    # is sometimes two sentences (~2.5 s, seen in CI), and barge-in needs the avatar still playing once the
    # person's speech is confirmed (barge_in_min_ms later).
    await asyncio.sleep(0.6)
    mark = len(c.log)
    second = "Stop, tell me about the sun instead."
    await feed_realtime(c.ws, np.concatenate([piper_16k(second), silence(0.9)]))

    t_speech, _ = await c.wait_for("speech_start", after=mark)
    t_int, interrupt = await c.wait_for("interrupt", after=mark)
    assert interrupt["turn_id"] == first
    # Media of the interrupted turn stops at once (from speech confirmed to its last fragment).
    last_media = max(t for t in c.media_at[first])
    assert t_int - t_speech < 0.2
    assert last_media - t_speech < 0.2, last_media - t_speech
    # The history holds only what the person heard: about 1.5-2.5 s of speech, not the whole reply.
    heard = interrupt["heard"]
    _, done1 = await c.wait_for("turn_done", after=0, turn_id=first)
    assert done1["reason"] in ("interrupted", "complete")
    full = done1["text"]
    assert heard and len(heard) < len(full), (heard, full)
    assert full.startswith(heard.split()[0])
    # The next answer follows, to the new question.
    _, start2 = await c.wait_for("turn_start", after=mark, timeout=30)
    assert word_match(second, start2["user_text"]) >= 0.7
    _, done2 = await c.wait_for("turn_done", after=mark, turn_id=start2["turn_id"], timeout=90)
    assert done2["reason"] == "complete"
    session_id = c.events("session")[0]["session_id"]
    session = next(s for s in live_app.app.state.sessions.sessions() if s.id == session_id)
    turns = [(m.role, m.content) for m in session.history.turns]
    assert ("assistant", heard) in turns
    assert ("assistant", full) not in turns
    await c.close()


async def test_malformed_audio_frames_give_errors_and_the_session_stays_up(live_app: LiveApp) -> None:
    ws = await connect(live_app.ws, max_size=None)
    c = VoiceClient(ws)
    c._reader = asyncio.create_task(c._read())
    await c.wait_for("session")
    limit = live_app.settings.voice.max_audio_frame_bytes
    await ws.send(frame(pcm16(silence(0.02))))  # audio before mic_start
    _, e = await c.wait_for("error")
    assert e["code"] == "audio_not_started" and not e["fatal"]
    await c.send(type="mic_start", sample_rate=44100)
    _, e = await c.wait_for("error", after=len(c.log) - 1, code="invalid_field")
    await c.send(type="mic_start")
    await c.wait_for("mic_ready")
    cases = [
        (frame(b"\x00\x01\x02"), "bad_audio"),  # odd byte count
        (frame(b"\x00" * limit), "audio_too_large"),
        (b"XY" + frame(b"")[2:], "bad_binary"),
        (frame(b"\x00\x00", kind=9), "bad_binary"),
        (b"\x00\x01", "bad_binary"),
    ]
    for payload, code in cases:
        mark = len(c.log)
        await ws.send(payload)
        _, e = await c.wait_for("error", after=mark)
        assert e["code"] == code and e["fatal"] is False, (code, e)
    mark = len(c.log)
    await c.send(type="playback", turn_id="x", position_ms=1)
    _, e = await c.wait_for("error", after=mark)
    assert e["code"] == "invalid_field"
    # Still up, and still listening: a real utterance works after all that.
    text = "What time is it?"
    await feed_realtime(ws, np.concatenate([piper_16k(text), silence(0.9)]))
    _, final = await c.wait_for("transcript", final=True)
    assert word_match(text, final["text"]) >= 0.75
    await c.wait_for("turn_done", timeout=90)
    await c.close()


async def _played_out(c: VoiceClient, turn_id: int) -> None:
    """Wait until the reply has been played to its end (its turn is done and its last second has played)."""
    _, done = await c.wait_for("turn_done", turn_id=turn_id, timeout=120)
    await asyncio.sleep(max(0.0, c.media_at[turn_id][0] + done["media_ms"] / 1000 + 0.8 - time.perf_counter()))


async def test_the_avatars_own_voice_through_speakers_is_not_a_barge_in(live_app: LiveApp) -> None:
    c = await VoiceClient(await connect(live_app.ws, max_size=None)).start()
    c.speaker = SpeakerMic(c.ws, delay_ms=120, gain_db=-6, rt60_s=0.3).start()
    ignored = metrics.ECHOES._value.get()
    await c.send(type="user_text", text="Tell me a story about a dragon who learns to bake bread.")
    _, start = await c.wait_for("turn_start")
    await _played_out(c, start["turn_id"])
    kinds = [k for _, k, _ in c.log]
    assert "interrupt" not in kinds and "speech_start" not in kinds and "transcript" not in kinds, kinds
    assert kinds.count("turn_start") == 1
    # Not vacuous: the echo was loud enough for the VAD to hear speech, and the check said it was the avatar.
    assert metrics.ECHOES._value.get() > ignored
    await c.speaker.close()
    await c.close()


async def test_the_person_talking_over_the_echo_still_barges_in(live_app: LiveApp) -> None:
    c = await VoiceClient(await connect(live_app.ws, max_size=None)).start()
    question = "Stop, tell me about the sun instead."
    voice = piper_16k(question)  # before the mic runs: synthesis blocks this loop
    c.speaker = SpeakerMic(c.ws, delay_ms=120, gain_db=-6, rt60_s=0.3, seed=1).start()
    await c.send(type="user_text", text="Tell me a long story about a brave knight and his horse.")
    _, start = await c.wait_for("turn_start")
    first = start["turn_id"]
    await c.wait_for("media_start", turn_id=first)
    await asyncio.sleep(1.5)  # the echo path is known by now: the reply has played for a while
    mark = len(c.log)
    c.speaker.say(voice)
    t_int, interrupt = await c.wait_for("interrupt", after=mark, timeout=10)
    assert interrupt["turn_id"] == first
    assert c.speaker.voice_started is not None
    onset = c.speaker.voice_started + int(np.argmax(np.abs(voice) > 0.02)) / 16000
    assert t_int - onset < 1.5, t_int - onset  # loose: a test on a busy machine (bench/bench_barge_in.py times it)
    # The new question is heard without the avatar's words before it.
    _, final = await c.wait_for("transcript", after=mark, final=True, timeout=30)
    assert word_match(question, final["text"]) >= 0.7, final["text"]
    await c.speaker.close()
    await c.close()


async def _ask_after(c: VoiceClient, question: str) -> dict:
    mark = len(c.log)
    c.speaker.say(np.concatenate([piper_16k(question), silence(1.0)]))
    await c.wait_for("speech_start", after=mark, timeout=15)
    _, final = await c.wait_for("transcript", after=mark, final=True, timeout=30)
    assert word_match(question, final["text"]) >= 0.7, final["text"]
    _, start = await c.wait_for("turn_start", after=mark, timeout=30)
    return start


async def test_a_question_after_the_reply_has_played_is_heard(live_app: LiveApp) -> None:
    """The page reports "not playing" at the end of the reply, and keeps its mic open: the next question counts."""
    c = await VoiceClient(await connect(live_app.ws, max_size=None)).start()
    c.speaker = SpeakerMic(c.ws, gain_db=-80).start()  # headphones: none of the reply reaches the mic
    await c.send(type="user_text", text="Say hello.")
    _, start = await c.wait_for("turn_start")
    await _played_out(c, start["turn_id"])
    # As the page's video element does once reset after its end: one more report, at 0 (seen in Chromium).
    assert c._player is not None
    c._player.cancel()
    await c.send(type="playback", turn_id=start["turn_id"], position_ms=0, playing=False, mic_samples=c.speaker.samples)
    await asyncio.sleep(1.5)  # past the room's tail
    start2 = await _ask_after(c, "What is the capital of France?")
    assert start2["turn_id"] == start["turn_id"] + 1
    await c.speaker.close()
    await c.close()


@pytest.mark.parametrize("prompt, made_in_full", [
    ("Tell me a long story about a brave knight and his horse.", False),  # stopped while the reply is made
    ("Say hello.", True),  # a short reply made in full, still playing: the turn's task is already done
])
async def test_a_question_after_the_person_stopped_the_reply_is_heard(live_app: LiveApp, prompt: str,
                                                                     made_in_full: bool) -> None:
    """Stop pressed while the avatar speaks: the page flushes its player there, and the next question counts."""
    c = await VoiceClient(await connect(live_app.ws, max_size=None)).start()
    c.speaker = SpeakerMic(c.ws, gain_db=-80).start()
    await c.send(type="user_text", text=prompt)
    _, start = await c.wait_for("turn_start")
    if made_in_full:
        _, done = await c.wait_for("turn_done", turn_id=start["turn_id"])
        assert done["reason"] == "complete"
        first = c.media_at[start["turn_id"]][0]
        assert time.perf_counter() - first < done["media_ms"] / 1000, "the reply had already played out"
        await c.send(type="stop")
        c.speaker.stop(start["turn_id"])
    else:
        await c.wait_for("media_start", turn_id=start["turn_id"])
        await asyncio.sleep(1.0)
        await c.send(type="stop")
        _, done = await c.wait_for("turn_done", turn_id=start["turn_id"])
        assert done["reason"] == "stopped"
    await asyncio.sleep(0.3)
    start2 = await _ask_after(c, "What is the capital of France?")
    assert start2["turn_id"] == start["turn_id"] + 1
    await c.speaker.close()
    await c.close()


async def test_an_unsure_echo_check_is_settled_by_the_avatars_words(live_app: LiveApp) -> None:
    """With a strict band fit (echo_threshold 0.3) the echo of a reverberant room often looks like a barge-in;
    its transcript, the avatar's own sentences, vetoes it. (How often Whisper garbles an echo into other words is
    tests/test_echo.py's business; here: the veto is wired to the live check.)"""
    c = await VoiceClient(await connect(live_app.ws, max_size=None)).start()
    session_id = c.events("session")[0]["session_id"]
    session = next(s for s in live_app.app.state.sessions.sessions() if s.id == session_id)
    session.settings.voice.echo_threshold = 0.3  # this session's copy of the settings
    c.speaker = SpeakerMic(c.ws, delay_ms=200, gain_db=-3, rt60_s=0.5, seed=2).start()
    echo, person = (metrics.ECHO_WORD_CHECKS.labels(k)._value.get() for k in ("echo", "person"))
    await c.send(type="user_text", text="Tell me a long story about a dragon who learns to bake bread.")
    deadline = time.perf_counter() + 90
    while metrics.ECHO_WORD_CHECKS.labels("echo")._value.get() == echo:
        assert time.perf_counter() < deadline, "no echo was vetoed by its words"
        await asyncio.sleep(0.2)
    vetoed = metrics.ECHO_WORD_CHECKS.labels("echo")._value.get() - echo
    passed = metrics.ECHO_WORD_CHECKS.labels("person")._value.get() - person
    assert vetoed >= passed, (vetoed, passed)
    await c.speaker.close()
    await c.close()
