"""The avatar: stored model, landmark detection, the renderer's warps, and the viseme track."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from avatarchat.config import PiperConfig
from avatarchat.engines.avatar.face import AvatarModel, NoFaceError, create_avatar, default_avatar_dir, detect_landmarks
from avatarchat.engines.avatar.renderer import AvatarRenderer
from avatarchat.engines.avatar.visemes import OPEN, PRESS, WIDE, mouth_track
from avatarchat.engines.tts.piper import PiperEngine
from avatarchat.engines.types import PhonemeTiming, Speech


@pytest.fixture(scope="module")
def model() -> AvatarModel:
    return AvatarModel.load(default_avatar_dir())


@pytest.fixture(scope="module")
def renderer(model: AvatarModel) -> AvatarRenderer:
    return AvatarRenderer(model)


def mouth_box(model: AvatarModel) -> tuple[slice, slice]:
    pts = model.landmarks[[61, 291, 0, 17]]
    (x0, y0), (x1, y1) = pts.min(0).astype(int) - 6, pts.max(0).astype(int) + 20
    return slice(y0, y1), slice(x0, x1)


def test_default_avatar_is_a_framed_face(model: AvatarModel) -> None:
    assert model.image.shape == (512, 512, 3) and model.image.dtype == np.uint8
    assert model.landmarks.shape == (478, 2)
    assert (model.landmarks >= 0).all() and (model.landmarks < 512).all()
    assert model.landmarks[13][1] > 256  # the mouth is in the lower half


def test_detection_matches_stored_landmarks_and_rejects_no_face(model: AvatarModel) -> None:
    found = detect_landmarks(model.image)
    assert np.median(np.linalg.norm(found - model.landmarks, axis=1)) < 2.0
    with pytest.raises(NoFaceError):
        detect_landmarks(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        detect_landmarks(np.zeros((10, 10), np.uint8))


def test_create_save_load_round_trip(tmp_path: Path) -> None:
    made = create_avatar(data.astronaut(), "astro", size=384)
    assert made.image.shape == (384, 384, 3)
    face_h = np.linalg.norm(made.landmarks[152] - made.landmarks[10])
    assert 0.4 * 384 < face_h < 0.6 * 384
    made.save(tmp_path / "astro")
    made.save(tmp_path / "astro")  # replacing an existing avatar is atomic too
    loaded = AvatarModel.load(tmp_path / "astro")
    assert loaded.name == "astro"
    assert np.abs(loaded.image.astype(int) - made.image.astype(int)).max() == 0
    assert np.allclose(loaded.landmarks, made.landmarks, atol=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astro"]


def test_rest_frame_is_the_portrait(renderer: AvatarRenderer, model: AvatarModel) -> None:
    # The idle frame where the head is closest to its rest pose, eyes open.
    def offset(i: int) -> float:
        tx, ty, roll, blink = renderer.idle_state(i)
        return abs(tx) + abs(ty) + 100 * abs(roll) + 10 * blink

    k = min(range(renderer.idle_period_frames), key=offset)
    assert offset(k) < 1.5
    frame = renderer.render(k, np.zeros(3))
    ys, xs = mouth_box(model)
    diff = np.abs(frame[ys, xs].astype(float) - model.image[ys, xs].astype(float)).mean()
    assert diff < 4.0
    assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8 and frame.flags["C_CONTIGUOUS"]


def test_opening_changes_the_mouth_and_darkens_the_cavity(renderer: AvatarRenderer, model: AvatarModel) -> None:
    rest = renderer.render(0, np.zeros(3))
    opened = renderer.render(0, np.array([1.0, 0.0, 0.0]))
    ys, xs = mouth_box(model)
    assert np.abs(opened[ys, xs].astype(float) - rest[ys, xs].astype(float)).mean() > 12
    # Between the lips (below the upper teeth) it is now dark: the oral cavity.
    x = int(model.landmarks[14][0])
    y_gap = int((model.landmarks[13][1] + model.landmarks[14][1]) / 2) + 6
    assert opened[y_gap, x].mean() < 90 < rest[y_gap, x].mean()
    # Far from the face nothing moves, whatever the pose: no seams at the warp border.
    for pose in ([1, 1, 0], [0.5, -1, 1]):
        f = renderer.render(57, np.array(pose, float))
        assert np.array_equal(f[:, :20], model.image[:, :20]) and np.array_equal(f[:, -25:], model.image[:, -25:])
        diff = np.abs(f.astype(int) - model.image.astype(int)).max(axis=2)
        cols = np.nonzero(diff.max(axis=0))[0]
        # The warp fades out: the columns at the edge of the moving region change by a level or two only.
        assert diff[:, cols[:4]].max() <= 3 and diff[:, cols[-4:]].max() <= 3


def test_wide_and_round_and_press_differ(renderer: AvatarRenderer, model: AvatarModel) -> None:
    ys, xs = mouth_box(model)
    wide = renderer.render(0, np.array([0.3, 1.0, 0.0]))[ys, xs].astype(float)
    round_ = renderer.render(0, np.array([0.3, -1.0, 0.0]))[ys, xs].astype(float)
    assert np.abs(wide - round_).mean() > 4
    pressed = renderer.render(0, np.array([0.0, 0.0, 1.0]))
    rest = renderer.render(0, np.zeros(3))
    # Pressing covers the teeth the portrait shows between its lips.
    x, y = int(model.landmarks[13][0]), int(model.landmarks[13][1] + 4)
    assert pressed[y, x].mean() < rest[y, x].mean() - 30


def test_blink_closes_the_eyes_only_during_a_blink(renderer: AvatarRenderer, model: AvatarModel) -> None:
    blink = next(i for i in range(200) if renderer.idle_state(i)[3] >= 1.0)
    calm = next(i for i in range(200) if renderer.idle_state(i)[3] == 0)
    for k in (468, 473):  # iris centres (refined landmarks)
        x, y = model.landmarks[k].astype(int)
        box = (slice(y - 4, y + 5), slice(x - 4, x + 5))
        dark_open = (renderer.render(calm, np.zeros(3))[box].mean(axis=2) < 90).mean()
        dark_closed = (renderer.render(blink, np.zeros(3))[box].mean(axis=2) < 90).mean()
        assert dark_open > 0.3 and dark_closed < 0.1  # the lid's skin covers the dark iris


def test_idle_loop_is_seamless_and_alive(renderer: AvatarRenderer) -> None:
    frames = list(renderer.idle_frames())
    assert len(frames) == renderer.idle_period_frames
    assert np.array_equal(renderer.render(renderer.idle_period_frames, np.zeros(3)), frames[0])
    steps = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:] + frames[:1])]
    assert max(steps) < 6  # no jump, including at the loop point
    assert np.abs(frames[0].astype(int) - frames[len(frames) // 4].astype(int)).mean() > 0.3  # head moves


def _speech(text: str) -> Speech:
    tts = PiperEngine(PiperConfig())
    tts.load()
    s = tts.synthesize(text)
    silence = np.zeros(s.sample_rate, np.float32)
    return Speech(np.concatenate([s.audio, silence]), s.sample_rate, s.phonemes, text)


@pytest.mark.parametrize("with_phonemes", [True, False])
def test_mouth_track_follows_real_speech(with_phonemes: bool) -> None:
    speech = _speech("Hello there, how are you doing today?")
    if not with_phonemes:
        speech = Speech(speech.audio, speech.sample_rate, None, speech.text)
    n = int(speech.duration * 25)
    track = mouth_track(speech, 25, n)
    assert track.shape == (n, 3) and track.dtype == np.float32
    talking = track[: n - 30]
    assert talking[:, OPEN].max() > 0.3
    assert np.abs(np.diff(talking[:, OPEN])).sum() > 3  # it opens and closes, not one held pose
    assert track[-20:, OPEN].max() < 0.05  # the appended second of silence: closed


def _phoneme_speech(phoneme: str) -> Speech:
    sr = 16000
    t = np.arange(int(0.6 * sr)) / sr
    audio = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    timings = (PhonemeTiming("^", 0.0, 0.1), PhonemeTiming(phoneme, 0.1, 0.5), PhonemeTiming("$", 0.5, 0.6))
    return Speech(audio, sr, timings)


def test_visemes_by_phoneme() -> None:
    mid = slice(5, 10)
    a = mouth_track(_phoneme_speech("a"), 25, 15)[mid].mean(0)
    i = mouth_track(_phoneme_speech("i"), 25, 15)[mid].mean(0)
    u = mouth_track(_phoneme_speech("u"), 25, 15)[mid].mean(0)
    m = mouth_track(_phoneme_speech("m"), 25, 15)[mid].mean(0)
    assert a[OPEN] > i[OPEN] + 0.2
    assert i[WIDE] > 0.4 and u[WIDE] < -0.4
    assert m[OPEN] < 0.05 and m[PRESS] > 0.6


def test_stress_marks_take_the_next_vowel() -> None:
    sr = 16000
    audio = np.full(int(0.6 * sr), 0.2, np.float32)
    timings = (PhonemeTiming("ˈ", 0.0, 0.3), PhonemeTiming("a", 0.3, 0.6))
    track = mouth_track(Speech(audio, sr, timings), 25, 15)
    assert track[3, OPEN] > 0.5


def test_cached_idle_frames_give_the_same_frames_for_less_work(model: AvatarModel) -> None:
    """With the idle frames cached (in I420, the encoder's format), a speaking frame warps and converts only the
    mouth's region, and shades only where the inside can show: the frames are the same, pixel for pixel, as
    the whole frame rendered and converted, over blinks, head motion and every kind of mouth; the cache stays
    within its budget."""
    import cv2

    from avatarchat.engines.avatar.frame_cache import FrameCache

    plain = AvatarRenderer(model)
    plain._gap_box = None  # the mouth's inside shaded over the whole mouth region
    i420 = model.image.nbytes // 2
    budget = 40 * i420
    cache = FrameCache(budget)
    cached = AvatarRenderer(model, cache=cache)
    assert cached._mouth_even is not None

    def want(k: int, row: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(plain.render(k, row), cv2.COLOR_RGB2YUV_I420)

    rng = np.random.default_rng(3)
    rows = [np.zeros(3, np.float32), np.array([0.9, 0.0, 0.0], np.float32), np.array([0.0, -0.6, 0.0], np.float32),
            np.array([0.05, 0.0, 0.7], np.float32)]
    blinking = [k for k in range(plain.idle_period_frames) if plain.idle_state(k)[3] > 0]
    frames = [*blinking[:4], 3, 77, 150, 199, 200 + blinking[0], 1234]
    for k in frames:
        for row in [*rows, rng.uniform([0, -0.6, 0], [1, 0.7, 0.7]).astype(np.float32)]:
            assert np.array_equal(cached.render_yuv(k, row), want(k, row)), (k, row)
    assert 0 < cache.bytes <= budget and len(cache) == len({k % 200 for k in frames})
    # Writing into a returned frame does not change what the cache holds.
    frame = cached.render_yuv(3, rows[0])
    frame[:] = 0
    assert np.array_equal(cached.render_yuv(3, rows[0]), want(3, rows[0]))
    # Past the budget the least recently used frames go, and come back rendered the same.
    for k in range(100):
        cached.render_yuv(k, rows[1])
    assert cache.bytes <= budget and len(cache) == 40
    assert np.array_equal(cached.render_yuv(frames[0], rows[1]), want(frames[0], rows[1]))
    # And the RGB frame is the same whatever the cache holds.
    assert np.array_equal(cached.render(77, rows[1]), plain.render(77, rows[1]))


def test_frame_cache_is_bounded_and_keeps_read_only_copies() -> None:
    from avatarchat.engines.avatar.frame_cache import FrameCache

    cache = FrameCache(3 * 1000)
    frames = [np.full(1000, k, np.uint8) for k in range(5)]
    for k, f in enumerate(frames):
        kept = cache.put(("a", k), f)
        assert not kept.flags.writeable and np.array_equal(kept, f)
    assert len(cache) == 3 and cache.bytes == 3000
    assert cache.get(("a", 0)) is None and cache.get(("a", 1)) is None
    assert cache.get(("a", 2)) is not None  # now the most recently used
    cache.put(("a", 5), frames[0])
    assert cache.get(("a", 3)) is None and cache.get(("a", 2)) is not None
    # A frame over the budget is not kept.
    big = np.zeros(4000, np.uint8)
    assert cache.put(("a", 9), big) is big and cache.get(("a", 9)) is None and cache.bytes == 3000
