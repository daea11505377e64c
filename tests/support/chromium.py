"""Debian's Chromium for the browser tests and benches, headless, optionally with a WAV file as its microphone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch(pw: Any, mic: Path | None = None, *extra: str) -> Any:
    """A browser (Playwright sync API ``pw``) that autoplays, is muted and, given ``mic``, hears that file once."""
    args = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--mute-audio", "--disable-gpu", *extra]
    if mic is not None:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={mic}%noloop"]
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
