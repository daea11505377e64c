"""The web app's microphone capture follows the settings (echo cancellation, noise suppression, auto gain), in
Debian's Chromium with a Piper question on the fake microphone; with the defaults the question is understood."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.chromium import CHROMIUM, launch
from tests.support.live_app import LiveApp
from tests.support.speech import piper_16k, silence, word_match, write_wav

WEBAPP = Path(__file__).resolve().parent.parent / "src" / "avatarchat" / "server" / "webapp"
FLAGS = ("echoCancellation", "noiseSuppression", "autoGainControl")
# web/src/lib/mic.ts CAPTURE_DEFAULTS (chosen by bench/bench_voice_page.py)
DEFAULTS = {"echoCancellation": True, "noiseSuppression": False, "autoGainControl": True}

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup"),
    pytest.mark.skipif(not (WEBAPP / "index.html").is_file(), reason="the web app is built by make setup"),
]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    text = "Can you tell me what the weather is like on the moon?"
    wav = write_wav(tmp_path_factory.mktemp("mic") / "q.wav", np.concatenate([silence(1.0), piper_16k(text), silence(3.0)]))
    with sync_playwright() as pw:
        b = launch(pw, wav)
        yield b, text
        b.close()


def _open(browser, live_app: LiveApp, saved: dict[str, bool] | None = None):  # type: ignore[no-untyped-def]
    ctx = browser.new_context(locale="en-US")
    if saved is not None:
        ctx.add_init_script(f"localStorage.setItem('avatarchat.settings.v1', {json.dumps(json.dumps(saved))})")
    page = ctx.new_page()
    page.goto(live_app.http + "/")
    page.wait_for_function("window.avatarChat && window.avatarChat.sessionId", timeout=60_000)
    return ctx, page


def _mic_on(page) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    page.click("[data-testid=mic]")
    page.wait_for_function("window.avatarChat.micOn", timeout=10_000)
    applied = page.evaluate("window.avatarChat.micSettings")
    return {k: applied[k] for k in FLAGS}


def test_defaults_capture_a_question_the_server_understands(live_app: LiveApp, chromium) -> None:  # type: ignore[no-untyped-def]
    browser, text = chromium
    ctx, page = _open(browser, live_app)
    assert _mic_on(page) == DEFAULTS
    page.wait_for_function("window.avatarChat.heard.length > 0", timeout=60_000)
    heard = page.evaluate("window.avatarChat.heard[0]")
    assert word_match(text, heard) >= 0.8, heard
    ctx.close()


def test_saved_flags_and_the_drawer_switches_apply_when_the_mic_opens(live_app: LiveApp, chromium) -> None:  # type: ignore[no-untyped-def]
    browser, _ = chromium
    saved = {"echoCancellation": False, "noiseSuppression": False, "autoGainControl": True}
    ctx, page = _open(browser, live_app, saved)
    assert _mic_on(page) == saved
    # Switched in the settings while the mic is on: the open mic keeps its processing, the next one has it.
    page.click("[data-testid=open-settings]")
    page.click("[data-testid=set-noiseSuppression]")
    page.click("[data-testid=set-echoCancellation]")
    assert page.evaluate("window.avatarChat.micSettings.noiseSuppression") is False
    page.keyboard.press("Escape")
    page.click("[data-testid=mic]")  # off
    page.wait_for_function("!window.avatarChat.micOn", timeout=10_000)
    switched = {"echoCancellation": True, "noiseSuppression": True, "autoGainControl": True}
    assert _mic_on(page) == switched
    stored = json.loads(page.evaluate("localStorage.getItem('avatarchat.settings.v1')"))
    assert {k: stored[k] for k in FLAGS} == switched
    ctx.close()
