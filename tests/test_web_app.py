"""The web app (web/, issue 4): its Vitest component tests, and its end-to-end tests in Debian's Chromium
(Node playwright-core, web/e2e/run.mjs) against the real app with the embedded models and a Piper voice
on the fake microphone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from tests.support.live_app import LiveApp

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "web"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
Q1 = "Tell me a long story about a dragon and a knight."
Q2 = "What is the tallest mountain in the world?"

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="Node.js and npm build the web app (make setup)")


@pytest.fixture(scope="module")
def built() -> None:
    """npm ci / npm run build when stale (a no-op when up to date, as after make setup)."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "web_build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (ROOT / "src" / "avatarchat" / "server" / "webapp" / "index.html").is_file()


def _node(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs node; its output goes to a log file as it comes, so a run cut short still shows where it was."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"node-{Path(args[-1]).stem}.log"
    with log.open("w+") as out:
        try:
            rc = subprocess.run(args, cwd=WEB, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            out.seek(0)
            pytest.fail(f"{' '.join(args)} ran past {timeout} s; its output so far:\n{out.read()[-8000:]}")
        out.seek(0)
        return subprocess.CompletedProcess(args, rc, out.read(), "")


def test_vitest_component_tests(built: None) -> None:
    r = _node(["npx", "vitest", "run", "--reporter=dot"], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout.split("Tests")[-1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup")
@pytest.mark.timeout(720)
def test_web_app_end_to_end_in_chromium(built: None, live_app: LiveApp, tmp_path: Path) -> None:
    from tests.support.speech import piper_16k, silence, write_wav

    # The fake mic: a question, a pause while the avatar answers, then a second question (the barge-in).
    wav = tmp_path / "questions.wav"
    write_wav(wav, np.concatenate([silence(1.0), piper_16k(Q1), silence(8.0), piper_16k(Q2), silence(4.0)]))
    portrait, noface = tmp_path / "astronaut.png", tmp_path / "noise.png"
    cv2.imwrite(str(portrait), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(noface), np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    from tests.support.faces import talking_clip

    clip = tmp_path / "talk.mp4"
    clip.write_bytes(talking_clip(10.5))
    ARTIFACTS.mkdir(exist_ok=True)
    r = _node(
        ["node", "e2e/run.mjs"],
        env={
            "AVATARCHAT_URL": live_app.http,
            "CHROMIUM": CHROMIUM,
            "E2E_WAV": str(wav),
            "E2E_Q1": Q1,
            "E2E_Q2": Q2,
            "E2E_PORTRAIT": str(portrait),
            "E2E_NOFACE": str(noface),
            "E2E_CLIP": str(clip),
            "E2E_ARTIFACTS": str(ARTIFACTS),
        },
        timeout=660,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " 0 failed" in r.stdout
    assert (ARTIFACTS / "web-speaking.png").is_file() and (ARTIFACTS / "web-monitor.png").is_file()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by make setup")
def test_web_app_shows_llm_failure_with_send_again(built: None, upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An LLM upstream that answers 500: the page says so and its retry sends the message again."""
    from avatarchat.config import load_settings
    from tests.support.openai_server import Behaviour

    upstream.behaviour = Behaviour(status=500)
    settings = load_settings(
        llm={"engine": "openai", "openai": {"base_url": upstream.base_url, "model": "test-model", "read_timeout_s": 5}},
        avatar={"dir": str(tmp_path / "avatars")},
    )
    app = LiveApp(settings).start()
    try:
        r = _node(["node", "e2e/run.mjs"], env={"AVATARCHAT_URL": app.http, "CHROMIUM": CHROMIUM, "E2E_SUITE": "llm_failure",
                                                "E2E_ARTIFACTS": str(ARTIFACTS)}, timeout=300)
    finally:
        app.stop()
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "1 passed, 0 failed" in r.stdout
    asked = [q for q in upstream.requests if any(m.get("content") == "Hello?" for m in q["body"].get("messages", []))]
    assert len(asked) == 2, upstream.requests  # the retry really asked the LLM again
