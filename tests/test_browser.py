"""The served page in a real browser (Debian's Chromium, headless): type, watch the avatar answer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live_app import LiveApp

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--disable-gpu",
                  "--disable-background-networking", "--mute-audio"],
        )
        yield b
        b.close()


def test_page_plays_the_answer_gaplessly(live_app: LiveApp, browser) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live_app.http)
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
    assert turn["reason"] == "complete" and turn["text"].strip()
    bot = page.inner_text("#transcript li.bot")
    assert bot.strip() == turn["text"].strip()
    # Gapless: every sentence played through with no stall, to the end of the streamed media.
    print(turn)
    assert turn["stalls"] == 0, turn
    assert abs(turn["playedTo"] * 1000 - turn["mediaMs"]) < 100, turn
    assert page.evaluate("window.avatarChat.state") == "ready"
    assert not errors
    page.close()


def test_page_stop_button_cuts_the_answer(live_app: LiveApp, browser) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.goto(live_app.http)
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
