"""The ``avatarchat`` command: say renders real lip-sync; doctor reports; bad input is a clear error."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from avatarchat.cli import main
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir

# MediaPipe face-mesh indices: mouth corners and the lip contour.
MOUTH = [61, 291, 0, 17, 13, 14, 78, 308]


def frames_and_audio(path: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].sample_rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio, rate


@pytest.fixture(scope="module")
def said(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("say") / "hello.mp4"
    assert main(["say", "Hello there. ... I am your avatar, and I can talk!", "-o", str(out)]) == 0
    return out


def test_say_writes_h264_with_audio_in_sync(said: Path) -> None:
    with av.open(str(said)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"
    frames, audio, rate = frames_and_audio(said)
    assert abs(len(frames) / 25 - len(audio) / rate) <= 0.04
    assert frames[0].shape == (512, 512, 3)


def test_say_mouth_moves_while_speaking_and_rests_when_silent(said: Path) -> None:
    frames, audio, rate = frames_and_audio(said)
    model = AvatarModel.load(default_avatar_dir())
    pts = model.landmarks[MOUTH]
    x0, y0 = (pts.min(0) - [12, 8]).astype(int)
    x1, y1 = (pts.max(0) + [12, 30]).astype(int)
    rest = model.image[y0:y1, x0:x1].astype(np.float32)
    motion = np.array([np.abs(f[y0:y1, x0:x1].astype(np.float32) - rest).mean() for f in frames])
    hop = rate // 25
    rms = np.array([np.sqrt(np.mean(audio[i * hop : (i + 1) * hop] ** 2)) for i in range(len(frames))])
    loud = rms > 0.05
    quiet = rms < 0.003
    assert loud.sum() > 20 and quiet.sum() > 3
    # Speaking frames open the mouth; silent frames are at rest (only idle head motion and compression).
    assert np.median(motion[loud]) > 2.5 * np.median(motion[quiet])
    assert np.percentile(motion[loud], 90) > 8
    # And the mouth keeps changing shape while speaking, rather than holding one pose.
    assert np.std(motion[loud]) > 1.5


def test_say_rejects_empty_text_and_unknown_avatar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["say", "   ", "-o", str(tmp_path / "a.mp4")]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["say", "hi", "-o", str(tmp_path / "b.mp4"), "--avatar", "nobody"]) == 1
    assert not (tmp_path / "b.mp4").exists()
    assert not list(tmp_path.glob(".say-*"))


def test_chat_asks_the_llm_through_an_openai_server(tmp_path: Path, upstream, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AVATARCHAT_LLM__ENGINE", "openai")
    monkeypatch.setenv("AVATARCHAT_LLM__OPENAI__BASE_URL", upstream.base_url)
    out = tmp_path / "chat.mp4"
    assert main(["chat", "Say hello", "-o", str(out)]) == 0
    assert upstream.behaviour.reply in capsys.readouterr().out
    frames, audio, rate = frames_and_audio(out)
    assert len(frames) > 25 and len(audio) / rate > 1.0


def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("llm:\n  engine: gpt9\n")
    assert main(["--config", str(cfg), "doctor"]) == 2
    assert "engine" in capsys.readouterr().err


def test_doctor_reports_every_part(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARCHAT_SERVER__PORT", "0")
    code = main(["doctor", "--files"])
    out = capsys.readouterr().out
    for part in ("LLM model (GGUF)", "Piper voice", "VAD model", "ASR model", "avatar 'default' landmarks", "port"):
        assert part in out
    assert code == 0, out


def test_doctor_says_how_to_fix_a_missing_model(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARCHAT_LLM__LLAMA_CPP__MODEL_PATH", "/nonexistent/x.gguf")
    monkeypatch.setenv("AVATARCHAT_SERVER__PORT", "0")
    assert main(["doctor", "--files"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "fix:" in out and "/nonexistent/x.gguf" in out


def test_doctor_checks_a_remote_llm(upstream, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARCHAT_LLM__ENGINE", "openai")
    monkeypatch.setenv("AVATARCHAT_LLM__OPENAI__BASE_URL", upstream.base_url)
    monkeypatch.setenv("AVATARCHAT_SERVER__PORT", "0")
    main(["doctor", "--files"])
    assert "GET /models → 200" in capsys.readouterr().out
