"""The served page in a real browser (Debian's Chromium, headless): type, watch the avatar answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chromium import CHROMIUM, launch
from tests.support.live_app import LiveApp

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup")


@pytest.fixture(scope="module")
def pw() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw) -> Iterator[object]:  # type: ignore[no-untyped-def]
    b = launch(pw, None, "--disable-background-networking")
    yield b
    b.close()


def test_page_plays_the_answer_gaplessly(live_app: LiveApp, browser) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live_app.http + "/basic")
    page.wait_for_function("window.avatarChat && window.avatarChat.state === 'ready'", timeout=30_000)
    assert page.evaluate("MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42C01E, mp4a.40.2\"')")
    # The idle loop plays before anyone types.
    page.wait_for_function("document.getElementById('idle').currentTime > 0.2", timeout=15_000)

    page.fill("#text", "Hello! Tell me about the moon.")
    page.press("#text", "Enter")
    page.wait_for_function("(() => { const t = window.avatarChat.lastTurn; return t && t.firstFrameAt; })()",
                           timeout=60_000)
    t1 = page.evaluate("document.getElementById('turn').currentTime")
    page.wait_for_timeout(700)
    t2 = page.evaluate("document.getElementById('turn').currentTime")
    assert t2 > t1 + 0.3, (t1, t2)  # the answer video is playing, in real time
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-speaking.png"))

    page.wait_for_function("window.avatarChat.lastTurn.ended", timeout=120_000)
    turn = page.evaluate("window.avatarChat.lastTurn")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "page-gapless-turn.json").write_text(json.dumps(turn, indent=1))
    assert turn["reason"] == "complete" and turn["text"].strip()
    bot = page.inner_text("#transcript li.bot")
    assert bot.strip() == turn["text"].strip()
    # Gapless: every sentence played through with no stall, to the end of the streamed media.
    assert turn["stalls"] == 0, json.dumps(turn)
    assert abs(turn["playedTo"] * 1000 - turn["mediaMs"]) < 100, turn
    assert page.evaluate("window.avatarChat.state") == "ready"
    assert not errors
    page.close()


def _other_session(url: str, text: str, out: dict[str, object]) -> None:
    """A second conversation on the same server, typed over its own WebSocket: runs one turn to the end."""
    from websockets.sync.client import connect

    with connect(url, max_size=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(30))["type"] == "session"
        ws.send(json.dumps({"type": "user_text", "text": text}))
        media = 0
        while True:
            msg = ws.recv(120)
            if isinstance(msg, bytes):
                media += len(msg)
                continue
            event = json.loads(msg)
            if event["type"] == "turn_done":
                out.update(reason=event["reason"], media_bytes=media, media_ms=event["media_ms"])
                return


def test_page_plays_gaplessly_while_another_session_speaks(live_app: LiveApp, browser) -> None:  # type: ignore[no-untyped-def]
    """Issue 13: two conversations at once; the page's answer must still play without a stall."""
    import threading

    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.goto(live_app.http + "/basic")
    page.wait_for_function("window.avatarChat && window.avatarChat.state === 'ready'", timeout=30_000)
    other: dict[str, object] = {}
    thread = threading.Thread(target=_other_session, args=(live_app.ws, "Tell me about the sea and its fish.", other))
    thread.start()
    page.fill("#text", "Hello! Tell me about the stars.")
    page.press("#text", "Enter")
    page.wait_for_function("(() => { const t = window.avatarChat.lastTurn; return t && t.ended; })()", timeout=120_000)
    thread.join(120)
    turn = page.evaluate("window.avatarChat.lastTurn")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "page-turn-beside-another-session.json").write_text(json.dumps(turn, indent=1))
    assert turn["reason"] == "complete" and turn["stalls"] == 0, json.dumps(turn)
    assert abs(turn["playedTo"] * 1000 - turn["mediaMs"]) < 100, turn
    assert other.get("reason") == "complete" and int(other["media_bytes"]) > 10_000, other  # type: ignore[arg-type]
    page.close()


def test_page_stop_button_cuts_the_answer(live_app: LiveApp, browser) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.goto(live_app.http + "/basic")
    page.wait_for_function("window.avatarChat && window.avatarChat.state === 'ready'", timeout=30_000)
    page.fill("#text", "Tell me a long story about a dragon and a knight.")
    page.press("#text", "Enter")
    page.wait_for_function("(() => { const t = window.avatarChat.lastTurn; return t && t.firstFrameAt; })()",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_function("window.avatarChat.lastTurn.reason === 'stopped'", timeout=5_000)
    assert page.evaluate("document.getElementById('turn').paused")
    assert page.evaluate("window.avatarChat.state") == "ready"
    assert page.locator("#transcript li.bot.stopped").count() == 1
    page.close()


def test_page_talks_through_the_microphone(live_app: LiveApp, pw, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Chromium's fake microphone plays a Piper recording: the AudioWorklet path yields a transcript and a reply."""
    import numpy as np

    from tests.support.speech import piper_16k, silence, word_match, write_wav

    text = "What is the tallest mountain in the world?"
    wav = write_wav(tmp_path / "question.wav", np.concatenate([silence(1.0), piper_16k(text), silence(2.5)]))
    b = launch(pw, wav)
    page = b.new_page()
    page.goto(live_app.http + "/basic")
    page.wait_for_function("window.avatarChat && window.avatarChat.state === 'ready'", timeout=30_000)
    page.click("#mic")
    page.wait_for_function("window.avatarChat.micOn", timeout=10_000)
    page.wait_for_function("window.avatarChat.heard.length > 0", timeout=30_000)
    heard = page.evaluate("window.avatarChat.heard[0]")
    assert word_match(text, heard) >= 0.7, heard
    page.wait_for_function("(() => { const t = window.avatarChat.lastTurn; return t && t.firstFrameAt; })()",
                           timeout=60_000)
    assert page.locator("#transcript li.user").first.inner_text() == heard
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-voice.png"))
    page.click("#mic")  # off again
    assert not page.evaluate("window.avatarChat.micOn")
    b.close()
