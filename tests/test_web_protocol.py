"""The server side of the web app: `session.update` (per-session settings) and GET /api/monitor."""

from __future__ import annotations

import os

import httpx

from avatarchat.server.ws import ProtocolError, parse_event
from tests.support.live_app import LiveApp
from tests.test_server import open_client

import pytest


@pytest.mark.parametrize(
    "event, message",
    [
        ('{"type":"session.update"}', "at least one of"),
        ('{"type":"session.update","rate":3}', "rate must be"),
        ('{"type":"session.update","rate":true}', "rate must be"),
        ('{"type":"session.update","rate":"fast"}', "rate must be"),
        ('{"type":"session.update","silence_ms":50}', "silence_ms must be"),
        ('{"type":"session.update","silence_ms":700.5}', "silence_ms must be"),
        ('{"type":"session.update","voice":""}', "voice must be"),
        ('{"type":"session.update","avatar":7}', "avatar must be"),
        ('{"type":"session.update","llm":"gpt"}', "llm must be"),
        ('{"type":"session.update","llm":{"model":3}}', "llm must be"),
        ('{"type":"playback","turn_id":1,"position_ms":5,"mic_samples":-1}', "mic_samples"),
        ('{"type":"playback","turn_id":1,"position_ms":5,"mic_samples":1.5}', "mic_samples"),
        ('{"type":"playback","turn_id":1,"position_ms":5,"mic_samples":true}', "mic_samples"),
        ('{"type":"playback","turn_id":1,"position_ms":5,"mic_samples":"9"}', "mic_samples"),
    ],
)
def test_session_update_types_and_ranges(event: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as e:
        parse_event(event, 100)
    assert e.value.code == "invalid_field"


def test_playback_may_say_at_which_mic_sample_it_was_read() -> None:
    assert parse_event('{"type":"playback","turn_id":1,"position_ms":5,"mic_samples":16000}', 100)["mic_samples"] == 16000
    assert "mic_samples" not in parse_event('{"type":"playback","turn_id":1,"position_ms":5}', 100)


async def test_session_update_applies_per_session_and_rejects_what_the_server_lacks(live_app: LiveApp) -> None:
    a = await open_client(live_app)
    b = await open_client(live_app)
    await a.send(type="session.update", rate=1.25, silence_ms=900)
    updated = await a.event()
    assert updated["type"] == "session.updated", updated
    s = updated["settings"]
    assert s["rate"] == 1.25 and s["silence_ms"] == 900 and s["avatar"] == "default"
    assert s["voice"] in s["options"]["voices"] and s["llm"] in s["options"]["llm"]
    # Only that session changed: the other keeps the configured defaults.
    await b.send(type="session.update", avatar="default")
    other = (await b.event())["settings"]
    assert other["rate"] == live_app.settings.tts.rate and other["silence_ms"] == live_app.settings.voice.silence_ms
    for bad, words in [
        ({"voice": "nobody"}, "no voice named"),
        ({"language": "xx"}, "is not available"),
        ({"llm": {"provider": "openai", "model": "gpt-4o"}}, "is not available"),
        ({"avatar": "ghost"}, "no avatar named"),
        ({"rate": 0.1}, "rate must be"),
    ]:
        await a.send(type="session.update", **bad)
        err = await a.event()
        assert err["type"] == "error" and err["code"] == "invalid_field" and not err["fatal"], err
        assert words in err["message"], err
    # A rejected update changes nothing, and the session stays up.
    await a.send(type="session.update", voice=s["voice"], language=s["language"], llm=s["llm"])
    again = await a.event()
    assert again["settings"]["rate"] == 1.25 and again["settings"]["silence_ms"] == 900
    # The new rate is what the next turn speaks at: a faster voice makes shorter media for the same text.
    await a.ws.close()
    await b.ws.close()


async def test_faster_rate_gives_shorter_media(live_app: LiveApp) -> None:
    from avatarchat.pipeline.media import speakable
    from tests.support.speech import _piper

    ratios = []
    for rate in (1.0, 1.6):
        c = await open_client(live_app)
        await c.send(type="session.update", rate=rate)
        assert (await c.event())["type"] == "session.updated"
        await c.send(type="user_text", text="Say exactly: The quick brown fox jumps over the lazy dog.")
        done, _ = await c.until("turn_done", timeout=120)
        await c.ws.close()
        assert done["reason"] == "complete"
        # Against the same voice reading the same reply at its own pace: the replies' wording varies (two
        # different texts once read at 60 and 52 ms a character at rates 1.0 and 1.6).
        ratios.append(done["media_ms"] / (1000 * _piper().synthesize(speakable(done["text"])).duration))
    assert 0.8 < ratios[0] < 1.25 and ratios[1] < 0.8 * ratios[0], ratios  # rate 1.6: ~0.63 of the time


async def test_monitor_reports_turns_sessions_process_and_errors(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    await c.send(type="user_text", text="Hi there!")
    done, _ = await c.until("turn_done", timeout=120)
    await c.send(type="session.update", rate=9)
    assert (await c.event())["code"] == "invalid_field"
    m = httpx.get(live_app.http + "/api/monitor").json()
    assert m["ready"] is True and m["sessions"] >= 1 and m["max_sessions"] == live_app.settings.session.max_sessions
    assert m["rss_mb"] > 50 and m["cpu_percent"] >= 0 and m["cpu_count"] >= 1
    # What a leak grows (bench/bench_soak.py): threads (this test shares the process), and a session's own
    # socket and tasks (its receive loop and writer).
    assert abs(m["threads"] - len(os.listdir("/proc/self/task"))) <= 2
    d = await open_client(live_app)
    more = httpx.get(live_app.http + "/api/monitor").json()
    assert more["fds"] >= m["fds"] + 1 and more["tasks"] >= m["tasks"] + 2, (m, more)
    await d.ws.close()
    assert m["errors"]["invalid_field"] >= 1 and m["errors_total"] >= m["errors"]["invalid_field"]
    assert m["frames_total"] > 0 and m["fps"] > 0 and m["target_fps"] == live_app.settings.avatar.fps
    assert isinstance(m["half_rate_batches"], dict)
    last = m["turns"][-1]
    assert last["turn_id"] == done["turn_id"] and last["reason"] == "complete"
    assert last["first_video"] == done["timings"]["first_video"] and last["asr_ms"] is None
    assert m["turns_total"]["complete"] >= 1
    assert len(httpx.get(live_app.http + "/api/monitor", params={"turns": 1}).json()["turns"]) == 1
    assert httpx.get(live_app.http + "/api/monitor", params={"turns": 0}).status_code == 422
    await c.ws.close()


def test_basic_page_stays_available(live_app: LiveApp) -> None:
    r = httpx.get(live_app.http + "/basic")
    assert r.status_code == 200 and "/static/app.js" in r.text
