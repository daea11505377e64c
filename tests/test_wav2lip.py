"""The Wav2Lip engine's plumbing: the mel front end, model checks, batching, blending, and the live and offline
paths, with a tiny ONNX model of Wav2Lip's inputs and output (tests/support/wav2lip_model.py). The real
network's visual quality is not measured here: its weights are not available to the tests."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.signal import resample_poly

from avatarchat.config import load_settings
from avatarchat.engines.avatar.base import SpeechTrack, wants_audio
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir
from avatarchat.engines.avatar.library import AvatarLibrary
from avatarchat.engines.avatar.renderer import AvatarRenderer
from avatarchat.engines.avatar.wav2lip import Wav2LipModelError, Wav2LipRenderer, load_model
from avatarchat.engines.avatar.wav2lip_audio import (
    HOP,
    MEL_STEP,
    N_FFT,
    mel_basis,
    mel_windows,
    melspectrogram,
    window_start,
)
from avatarchat.engines.registry import AVATAR_ENGINES, avatar_library
from tests.support import wav2lip_model

SR = 16000


def tone(freq: float, seconds: float, amp: float = 0.3, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, amp: float = 0.3, rate: int = 22050, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).uniform(-1, 1, int(seconds * rate))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wav2lip_model.build(tmp_path_factory.mktemp("w2l") / "tiny.onnx")


@pytest.fixture(scope="module")
def avatar() -> AvatarModel:
    return AvatarModel.load(default_avatar_dir())


@pytest.fixture(scope="module")
def renderer(tiny: Path, avatar: AvatarModel) -> Wav2LipRenderer:
    return Wav2LipRenderer(avatar, load_model(tiny))


def track_of(audio: np.ndarray, rate: int = 22050) -> SpeechTrack:
    track = SpeechTrack(rate, 25)
    track.push(audio)
    track.begin(0)
    return track


# -- the mel front end ---------------------------------------------------------------------------------


def test_mel_shape_range_silence_and_tone() -> None:
    one_s = tone(1000, 1.0)
    mel = melspectrogram(one_s)
    assert mel.shape == (80, 1 + len(one_s) // HOP) and mel.dtype == np.float32  # 80 frames a second
    assert mel.min() >= -4.0 and mel.max() <= 4.0
    assert np.all(melspectrogram(np.zeros(SR, np.float32)) == -4.0)  # silence is the floor
    # A 1 kHz tone peaks in the band whose filter is centred nearest 1 kHz, and only around it.
    freqs = np.linspace(0, SR / 2, 1 + N_FFT // 2)
    centres = freqs[mel_basis().argmax(axis=1)]
    band = int(mel[:, 10:-10].mean(axis=1).argmax())
    assert abs(centres[band] - 1000) <= 60
    assert mel[band, 10:-10].mean() > -1.0 and mel[:, 10:-10].mean() < mel[band, 10:-10].mean() - 2
    # Louder is higher; a low tone lights a low band.
    assert melspectrogram(tone(1000, 1.0, 0.03))[band, 10:-10].mean() < mel[band, 10:-10].mean() - 1
    assert int(melspectrogram(tone(220, 1.0))[:, 10:-10].mean(axis=1).argmax()) < band - 20


def test_mel_matches_wav2lips_own_front_end() -> None:
    """Against Wav2Lip's audio.py on librosa (scripts/wav2lip_mel_reference.py made the reference)."""
    reference = np.load(Path(__file__).parent / "support" / "wav2lip_mel_reference.npy")
    t = np.arange(8000) / 16000
    chirp = 0.25 * np.sin(2 * np.pi * (150 * t + 3000 * t * t)) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    mel = melspectrogram((chirp * np.sin(np.pi * t / 0.5)).astype(np.float32))
    assert mel.shape == reference.shape == (80, 41)
    assert np.abs(mel - reference).max() < 1e-3


def test_mel_filters_are_slaney_area_normalized() -> None:
    basis = mel_basis()
    assert basis.shape == (80, 401) and (basis >= 0).all()
    # Each triangle's area is 1 in Hz (librosa's norm="slaney"), measured on the 20 Hz bins where it is wide.
    areas = basis.sum(axis=1) * (SR / N_FFT)
    assert np.allclose(areas[40:], 1.0, atol=0.05)
    assert np.all(np.diff(basis.argmax(axis=1)) >= 0)  # centres rise with the band


def test_streamed_windows_match_the_whole_signal() -> None:
    rng = np.random.default_rng(1)
    audio = (0.2 * rng.standard_normal(3 * SR)).astype(np.float32) * tone(3, 3.0, 1.0)  # a swelling noise
    whole = melspectrogram(audio)
    frames = [5, 6, 30, 61]
    got = mel_windows(frames, 25, lambda n0, n1: np.pad(audio, (max(0, -n0), 0))[max(0, n0) : n1 + max(0, -n0)]
                      if n1 <= len(audio) else np.zeros(n1 - n0, np.float32))
    assert got.shape == (4, 80, MEL_STEP)
    for f, window in zip(frames, got):
        s = window_start(f, 25)
        assert s == int(3.2 * (f - 2))  # centred: Wav2Lip's training window for frame f starts at frame f - 2
        assert np.allclose(window, whole[:, s : s + MEL_STEP], atol=2e-3)


def test_speech_track_resamples_in_pieces_like_all_at_once() -> None:
    audio = noise(2.0, rate=22050)
    whole = resample_poly(audio, 320, 441).astype(np.float32)
    track = track_of(audio)
    for n0, n1 in ((1000, 4200), (4200, 9000), (20000, 25000)):
        assert np.allclose(track.resampled(n0, n1, SR), whole[n0:n1], atol=1e-4)
    assert np.all(track.resampled(40000, 41000, SR) == 0)  # not pushed yet: silence
    track.forget_before(60)  # 2.4 s in: only the last second is kept
    assert track.samples(0, 10).tolist() == [0.0] * 10
    assert np.allclose(track.resampled(23000, 28000, SR), whole[23000:28000], atol=1e-4)


# -- the model file ------------------------------------------------------------------------------------


def test_model_checks_give_clear_errors(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(Wav2LipModelError, match="model_path is not set.*docs/wav2lip.md"):
        load_model(None)
    with pytest.raises(Wav2LipModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(Wav2LipModelError, match="not a loadable ONNX model"):
        load_model(tmp_path / "junk.onnx")
    wrong_name = wav2lip_model.build(tmp_path / "name.onnx", audio_name="mel")
    with pytest.raises(Wav2LipModelError, match="inputs mel .*input_names=\\['audio', 'video'\\]"):
        load_model(wrong_name)
    wrong_shape = wav2lip_model.build(tmp_path / "shape.onnx", video_shape=(3, 96, 96))
    with pytest.raises(Wav2LipModelError, match="input video is tensor\\(float\\) \\(B, 3, 96, 96\\); Wav2Lip needs"):
        load_model(wrong_shape)
    model = load_model(tiny)
    assert model.fixed_batch is None and model.output == "face" and "dynamic batch" in model.describe()


def test_a_fixed_batch_export_runs_in_padded_batches(tmp_path: Path, tiny: Path) -> None:
    fixed = load_model(wav2lip_model.build(tmp_path / "b4.onnx", batch=4))
    dynamic = load_model(tiny)
    rng = np.random.default_rng(2)
    audio = rng.uniform(-4, 4, (7, 1, 80, 16)).astype(np.float32)
    video = rng.uniform(0, 1, (7, 6, 96, 96)).astype(np.float32)
    assert fixed.fixed_batch == 4
    out = fixed.run(audio, video, batch_size=2)
    assert out.shape == (7, 3, 96, 96)
    assert np.allclose(out, dynamic.run(audio, video, batch_size=3), atol=1e-6)
    # The network sees the reference crop: the tiny model hands it back where it does not brighten.
    assert np.allclose(out[:, :, :48], video[:, 3:, :48], atol=1e-6)


# -- rendering and blending ------------------------------------------------------------------------------


def test_louder_speech_changes_only_the_mouth_region(renderer: Wav2LipRenderer) -> None:
    assert wants_audio(renderer) and not wants_audio(renderer.base)
    frames = list(range(50, 60))
    silent = renderer.render_speech(frames, np.zeros((10, 3)), track_of(np.zeros(3 * 22050, np.float32)))
    quiet = renderer.render_speech(frames, np.zeros((10, 3)), track_of(noise(3.0, amp=0.01)))
    loud = renderer.render_speech(frames, np.zeros((10, 3)), track_of(noise(3.0, amp=0.3)))
    y0, y1, x0, x1 = renderer.box
    top = int(np.nonzero(renderer.mask.max(axis=1))[0][0])
    # Around the mouth: the warp renderer's frame with the mouth at rest (idle motion and blinks go on).
    assert np.array_equal(renderer.render(57), AvatarRenderer(renderer.base.model).render(57, np.zeros(3)))
    for k, s, q, lo in zip(frames, silent, quiet, loud):
        base = renderer.render(k)
        dy0, dy1, dx0, dx1 = renderer.box_at(k)
        mask = np.zeros(base.shape[:2], bool)
        mask[dy0:dy1, dx0:dx1] = renderer.mask > 0
        for img in (s, q, lo):
            assert np.array_equal(img[~mask], base[~mask])  # nothing outside the blended region changes
        region = (slice(dy0 + top + 10, dy1 - 10), slice(dx0 + 30, dx1 - 30))
        d_silent = np.abs(s[region].astype(float) - base[region]).mean()
        d_quiet = np.abs(q[region].astype(float) - base[region]).mean()
        d_loud = np.abs(lo[region].astype(float) - base[region]).mean()
        assert d_silent < 3.0  # silence: the crop's round trip through 96×96 only
        assert d_silent < d_quiet < d_loud - 15  # louder audio, a different mouth region
    assert (y1 - y0, x1 - x0) == renderer.mask.shape[:2]


def _grad(img: np.ndarray) -> np.ndarray:
    g = img.astype(np.float32).mean(axis=2)
    gy, gx = np.zeros_like(g), np.zeros_like(g)
    gy[1:] = np.abs(np.diff(g, axis=0))
    gx[:, 1:] = np.abs(np.diff(g, axis=1))
    return np.maximum(gx, gy)


def test_the_blend_has_no_hard_edge(renderer: Wav2LipRenderer) -> None:
    k = 50
    track = track_of(noise(3.0, amp=0.3))
    [soft] = renderer.render_speech([k], np.zeros((1, 3)), track)
    base = renderer.render(k)
    dy0, dy1, dx0, dx1 = renderer.box_at(k)
    m = np.zeros(base.shape[:2], np.float32)
    m[dy0:dy1, dx0:dx1] = renderer.mask
    # The boundary: the mask's edge, a few px either side of where the blend starts (sides, bottom, top).
    support = m > 0
    ring = np.zeros_like(support)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            ring |= np.roll(support, (dy, dx), axis=(0, 1)) != support
    source = _grad(base)[ring]
    blended = _grad(soft)[ring]
    assert np.percentile(blended, 99) <= 1.1 * np.percentile(source, 99) + 1
    assert np.percentile(blended - source, 99) < 6  # the blend adds no step where it begins
    assert np.abs(soft.astype(float) - base)[support].max() > 60  # though the region it blends in changed a lot
    # The same frame pasted with a hard-edged mask has the step this test is there to catch.
    hard = Wav2LipRenderer(renderer.base.model, renderer.model)
    hard.mask = (renderer.mask > 0).astype(np.float32)
    [pasted] = hard.render_speech([k], np.zeros((1, 3)), track)
    assert np.percentile(_grad(pasted)[ring] - source, 99) > 30


def test_render_batch_hands_the_speech_to_the_renderer(renderer: Wav2LipRenderer) -> None:
    from avatarchat.engines.video.fmp4 import Fmp4Stream
    from avatarchat.pipeline.media import render_batch, speech_track

    calls: list[list[int]] = []

    class Spy:
        wants_audio = True
        fps, idle_period_frames, size = 25, 200, renderer.size

        def render(self, k: int, mouth: object, out: object = None) -> np.ndarray:
            raise AssertionError("a renderer driven by audio renders through render_speech")

        def render_speech(self, frames: list[int], mouth: np.ndarray, speech: SpeechTrack) -> list[np.ndarray]:
            calls.append(list(frames))
            assert speech.origin == 100 and speech.pushed == 22050 * 6 // 25
            return [renderer.render(k) for k in frames]

    spy = Spy()
    track = speech_track(spy, 22050, 25)  # type: ignore[arg-type]
    assert track is not None and speech_track(renderer.base, 22050, 25) is None
    stream = Fmp4Stream(*renderer.size, 25, 22050)
    stream.start()
    render_batch(stream, spy, np.zeros((6, 3)), 100, noise(6 / 25), hold=2, speech=track)  # type: ignore[arg-type]
    assert calls == [[100, 102, 104]] and stream.frames == 6  # one call per batch; under overload every 2nd face
    stream.abort()


# -- through the configured engine: live pipeline, say, doctor ------------------------------------------------


def _speech(text: str):  # -> Speech
    from avatarchat.config import PiperConfig
    from avatarchat.engines.tts.piper import PiperEngine

    tts = PiperEngine(PiperConfig())
    tts.load()
    return tts.synthesize(text)


def _decode(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_a_piece_renders_and_encodes_through_the_live_path(tiny: Path, tmp_path: Path) -> None:
    from avatarchat.pipeline.avatar_media import LocalAvatarMedia
    from avatarchat.pipeline.media import Timeline
    from avatarchat.pipeline.scheduler import CpuScheduler

    settings = load_settings(avatar={"engine": "wav2lip", "dir": str(tmp_path), "wav2lip": {"model_path": str(tiny)}})
    library = avatar_library(settings)
    renderer = library.renderer("default")
    assert isinstance(renderer, Wav2LipRenderer)
    piece = Timeline(25, 22050).prepare(_speech("Hello there, how are you?"))
    cpu = CpuScheduler(1)

    async def go() -> bytes:
        media = LocalAvatarMedia(library, cpu, settings)
        stream = await media.open("default", 22050)
        out, pos, fed = b"", 0, 0
        while pos < piece.frames:  # as pipeline/turn.py feeds it: 2 frames first, then 5, audio 3072 samples ahead
            rows = piece.mouth[pos : pos + (2 if pos == 0 else 5)]
            until = piece.audio_until(pos + len(rows), 3072)
            audio, fed = piece.audio[fed:until], max(fed, until)
            out += await stream.batch(rows, 1000 + pos, audio if len(audio) else None)
            pos += len(rows)
        return out + await stream.close()

    try:
        data = asyncio.run(go())
    finally:
        cpu.close()
    frames = _decode(data)
    assert len(frames) >= piece.frames and frames[0].shape == (512, 512, 3)
    y0, y1, x0, x1 = renderer.box
    mouth = (slice((y0 + y1) // 2 + 20, y1 - 20), slice(x0 + 40, x1 - 40))
    rest = renderer.render(1000)[mouth].astype(float)
    change = [np.abs(f[mouth].astype(float) - rest).mean() for f in frames[: piece.frames]]
    assert max(change) > 20 and min(change) < 8  # speech brightens the mouth region, pauses do not
    eyes = (slice(y0 + 40, (y0 + y1) // 2 - 30), slice(x0, x1))
    assert max(np.abs(f[eyes].astype(float) - renderer.render(1000 + i)[eyes]).mean() for i, f in enumerate(frames[:30])) < 6


def test_say_with_the_wav2lip_engine(tiny: Path, tmp_path: Path) -> None:
    from contextlib import nullcontext

    from avatarchat.render import RenderError, render_to_file

    settings = load_settings(avatar={"engine": "wav2lip", "dir": str(tmp_path), "wav2lip": {"model_path": str(tiny)}})
    info = render_to_file(settings, "Hi there.", tmp_path / "hi.mp4", "default", ask_llm=False, step=lambda _s: nullcontext())
    frames = _decode((tmp_path / "hi.mp4").read_bytes())
    assert len(frames) >= info.frames > 10
    missing = load_settings(avatar={"engine": "wav2lip", "dir": str(tmp_path)})
    with pytest.raises(RenderError, match="model_path is not set"):
        render_to_file(missing, "Hi.", tmp_path / "no.mp4", "default", ask_llm=False, step=lambda _s: nullcontext())


def test_doctor_reports_a_missing_or_wrong_model(tiny: Path, tmp_path: Path) -> None:
    from avatarchat.doctor import checks
    from avatarchat.probe import fix, probe_avatar, run_probes

    good = load_settings(avatar={"engine": "wav2lip", "wav2lip": {"model_path": str(tiny)}})
    assert probe_avatar(good).startswith("wav2lip tiny.onnx: audio (B, 1, 80, 16)")
    wrong = wav2lip_model.build(tmp_path / "wrong.onnx", video_shape=(3, 96, 96))
    bad = load_settings(avatar={"engine": "wav2lip", "wav2lip": {"model_path": str(wrong)}})
    [result] = run_probes(bad, ["avatar"])
    assert not result.ok and "input video is tensor(float) (B, 3, 96, 96)" in result.detail
    assert "docs/wav2lip.md" in fix("avatar", bad) and "docs/wav2lip.md" not in fix("avatar", load_settings())
    unset = load_settings(avatar={"engine": "wav2lip"})
    [check] = [c for c in checks(unset) if c.name == "Wav2Lip model (ONNX)"]
    assert not check.ok and "model_path is not set" in check.detail
    assert AVATAR_ENGINES["warp"](load_settings()) is None
    assert isinstance(AvatarLibrary(None, 25).renderer("default"), AvatarRenderer)
