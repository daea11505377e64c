"""Issue 15's bar for the portrait renderer, measured on its output by MediaPipe (engines/avatar/quality.py):
on every test portrait an open mouth shows teeth or tongue (no flat hole), no seam, lids that close, and
a mouth in time with the speech. And the measures themselves tell a bad face from a good one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from avatarchat.engines.avatar import quality
from avatarchat.engines.avatar.face import AvatarModel, create_avatar, default_avatar_dir
from avatarchat.engines.avatar.renderer import INNER_LOWER, INNER_UPPER, AvatarRenderer
from avatarchat.pipeline.media import Timeline
from tests.support.faces import darker_skin, portrait
from tests.support.speech import _piper


def face(name: str) -> np.ndarray:
    image = AvatarModel.load(default_avatar_dir()).image if name.startswith("default") else portrait()
    if name.endswith("_dim"):  # the same photo in poor light
        image = (image.astype(np.float32) * 0.4).astype(np.uint8)
    if name.endswith("_dark"):  # much darker skin
        image = darker_skin(image)
    return image


# default: smiling, teeth showing; grace_hopper: closed lips, glasses, wrinkles.
@pytest.fixture(scope="module", params=["default", "default_dark", "grace_hopper", "grace_hopper_dim", "grace_hopper_dark"])
def renderer(request: pytest.FixtureRequest) -> AvatarRenderer:
    if request.param == "default":
        return AvatarRenderer(AvatarModel.load(default_avatar_dir()))
    return AvatarRenderer(create_avatar(face(request.param), request.param))


@pytest.fixture(scope="module")
def piece():  # type: ignore[no-untyped-def]
    return Timeline(25, 22050).prepare(_piper().synthesize("Hello there! Ask me a question, and I will answer as well as I can."))


def test_an_open_mouth_shows_teeth_or_tongue_not_a_flat_hole(renderer: AvatarRenderer) -> None:
    with quality.FaceTracker(video=False) as mesh:
        for opening in (0.5, 0.8, 1.0):
            frame = renderer.render(0, np.array([opening, 0.0, 0.0], np.float32))
            lm = mesh.landmarks(frame)
            assert lm is not None
            inside = quality.interior(frame, lm)
            assert inside.pixels > 50 and inside.textured, (opening, inside)


def test_the_lids_close_over_the_eyes(renderer: AvatarRenderer) -> None:
    blink = max(range(renderer.idle_period_frames), key=lambda k: renderer.idle_state(k)[3])
    calm = min(range(renderer.idle_period_frames), key=lambda k: renderer.idle_state(k)[3] + abs(renderer.idle_state(k)[0]))
    shut, wide = renderer.render(blink, np.zeros(3)), renderer.render(calm, np.zeros(3))
    lm = renderer.model.landmarks
    assert quality.lid_cover(wide, lm) < 0.45 < 0.85 < quality.lid_cover(shut, lm)  # skin over the eye, closed
    with quality.FaceTracker(video=False) as mesh:
        seen_shut, seen_wide = mesh.landmarks(shut), mesh.landmarks(wide)
    assert seen_shut is not None and seen_wide is not None
    # MediaPipe leans towards open eyes, but sees them close too.
    assert quality.eye_openness(seen_shut) < 0.75 * quality.eye_openness(seen_wide)


def test_speech_moves_the_mouth_in_time_and_without_a_seam(renderer: AvatarRenderer, piece) -> None:  # type: ignore[no-untyped-def]
    frames = [renderer.render(k, row) for k, row in enumerate(piece.mouth)]
    marks = quality.track(frames)
    assert all(m is not None for m in marks)
    opening = np.array([quality.mouth_opening(m) for m in marks])  # type: ignore[arg-type]
    r, lag = quality.lip_sync(quality.loudness(piece.audio, 22050, 25, len(frames)), opening)
    assert r >= 0.3 and abs(lag) <= 1, (r, lag)
    seams = [s for k, row in enumerate(piece.mouth) if row[0] > 0.3
             and (s := quality.seam(frames[k], rest := renderer.render(k, np.zeros(3)), rest)) is not None]
    assert seams and np.median(seams) < 1.4, seams


def test_teeth_follow_the_photos_light_not_the_skins_tone() -> None:
    def teeth(image: np.ndarray) -> float:
        r = AvatarRenderer(create_avatar(image, "x"))
        frame = r.render(0, np.array([0.8, 0.0, 0.0], np.float32))
        with quality.FaceTracker(video=False) as mesh:
            lm = mesh.landmarks(frame)
        assert lm is not None
        inner = np.zeros(frame.shape[:2], np.uint8)
        cv2.fillPoly(inner, [np.round(np.concatenate([lm[INNER_UPPER], lm[INNER_LOWER][::-1]])).astype(np.int32)], 1)
        y = frame[inner > 0].astype(np.float32) @ quality.LUMA
        return float(np.percentile(y, 95))

    for name in ("default", "grace_hopper"):
        light, dark, dim = teeth(face(name)), teeth(face(name + "_dark")), teeth(face(name + "_dim"))
        assert dark > 0.85 * light, (name, light, dark)  # dark skin, same light: teeth as bright
        assert dim < 0.6 * light, (name, light, dim)  # a dim photo: dim teeth, not glowing ones


def test_the_measures_catch_a_flat_hole_and_a_hard_seam() -> None:
    renderer = AvatarRenderer(AvatarModel.load(default_avatar_dir()))
    good = renderer.render(0, np.array([0.8, 0.0, 0.0], np.float32))
    rest = renderer.render(0, np.zeros(3))
    with quality.FaceTracker(video=False) as mesh:
        lm = mesh.landmarks(good)
    assert lm is not None and quality.interior(good, lm).textured
    hole = good.copy()  # the old renderer's look: a flat dark fill between the lips
    cv2.fillPoly(hole, [np.round(np.concatenate([lm[INNER_UPPER], lm[INNER_LOWER][::-1]])).astype(np.int32)], (40, 14, 18))
    assert not quality.interior(hole, lm).textured
    pasted = rest.copy()  # a patch pasted with a hard edge
    y, x = lm[14].astype(int)[::-1]
    pasted[y - 30 : y + 30, x - 50 : x + 50] = cv2.add(cv2.GaussianBlur(pasted, (0, 0), 6)[y - 30 : y + 30, x - 50 : x + 50], 25)
    assert quality.seam(pasted, rest, rest) >= 2.0  # type: ignore[operator]
    assert quality.seam(rest, rest, rest) is None  # nothing changed
    assert quality.seam(good, rest, rest) < 1.5  # type: ignore[operator]
