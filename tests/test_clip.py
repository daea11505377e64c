"""Video avatars (engines/avatar/clip.py): a clip of a talking person becomes the idle loop, and its own mouth
images follow any speech. Measured on the output frames by MediaPipe (engines/avatar/quality.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatarchat.engines.avatar import quality
from avatarchat.engines.avatar.clip import AvatarClip, ClipError, ClipLimits, ClipRenderer, make_clip
from avatarchat.engines.avatar.face import AvatarModel
from avatarchat.engines.avatar.library import AvatarLibrary
from avatarchat.pipeline.media import Timeline
from tests.support.faces import talking_clip
from tests.support.speech import _piper

LIMITS = ClipLimits(min_s=5.0, max_s=20.0, loop_s=3.0)


@pytest.fixture(scope="module")
def clip_bytes() -> bytes:
    return talking_clip(8.0)


@pytest.fixture(scope="module")
def made(clip_bytes: bytes) -> tuple[np.ndarray, np.ndarray, AvatarClip]:
    return make_clip(clip_bytes, limits=LIMITS)


@pytest.fixture(scope="module")
def renderer(made: tuple[np.ndarray, np.ndarray, AvatarClip]) -> ClipRenderer:
    return ClipRenderer(made[2])


def test_a_clip_is_framed_and_keeps_its_quietest_stretch_as_the_loop(made: tuple[np.ndarray, np.ndarray, AvatarClip]) -> None:
    portrait, landmarks, clip = made
    assert portrait.shape == (512, 512, 3) and landmarks.shape == (478, 2)
    assert clip.frames == 200 and clip.landmarks.shape == (200, 478, 2)
    assert len(clip.loop) == 75  # loop_s 3 s at 25 fps
    assert clip.loop_start < 2 * 25  # the quiet first 2 s, not the talk
    face_h = np.linalg.norm(landmarks[152] - landmarks[10])
    assert 0.4 * 512 < face_h < 0.6 * 512  # framed as a portrait is
    # The portrait is a frame of the loop whose face the mesh finds where the clip's landmarks say.
    with quality.FaceTracker(video=False) as mesh:
        found = mesh.landmarks(portrait)
    assert found is not None and np.median(np.linalg.norm(found - landmarks, axis=1)) < 3.0


def test_the_idle_loop_plays_forward_and_back_without_a_jump(renderer: ClipRenderer) -> None:
    period = renderer.idle_period_frames
    assert period == 2 * 75 - 2
    indices = [renderer.base_index(k) for k in range(2 * period + 1)]
    assert max(abs(a - b) for a, b in zip(indices, indices[1:])) == 1  # neighbours, also where it turns and wraps
    frames = list(renderer.idle_frames())
    assert len(frames) == period
    steps = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:] + frames[:1])]
    assert max(steps) < 6


def test_the_mouth_follows_the_wanted_opening(renderer: ClipRenderer) -> None:
    with quality.FaceTracker(video=False) as mesh:
        seen = []
        for opening in (0.0, 0.5, 1.0):
            lm = mesh.landmarks(renderer.render(10, np.array([opening, 0.0, 0.0], np.float32)))
            assert lm is not None
            seen.append(quality.mouth_opening(lm))
    assert seen[0] < seen[1] < seen[2] and seen[2] - seen[0] > 0.04, seen


def test_speech_drives_the_clips_own_mouths_in_sync_and_without_a_seam(renderer: ClipRenderer) -> None:
    piece = Timeline(25, 22050).prepare(_piper().synthesize("Good morning! Shall we talk about the history of ships?"))
    frames = [renderer.render(k, row) for k, row in enumerate(piece.mouth)]
    pasted = [k for k, row in enumerate(piece.mouth) if renderer.pick(renderer.base_index(k), row) != renderer.base_index(k)]
    assert len(pasted) > len(frames) // 3
    marks = quality.track(frames)
    assert all(m is not None for m in marks)
    opening = np.array([quality.mouth_opening(m) for m in marks])  # type: ignore[arg-type]
    r, _ = quality.lip_sync(quality.loudness(piece.audio, 22050, 25, len(frames)), opening)
    assert r >= 0.3, r
    rest = [renderer.render(k, np.zeros(3, np.float32)) for k in pasted]
    seams = [s for k, still in zip(pasted, rest) if (s := quality.seam(frames[k], still, still)) is not None]
    assert seams and np.median(seams) < 1.5, seams


def test_a_phone_clip_stored_on_its_side_is_turned_upright() -> None:
    portrait, landmarks, clip = make_clip(talking_clip(6.0, rotated=True), limits=LIMITS)
    assert clip.frames == 150
    assert landmarks[152][1] > landmarks[10][1] + 200  # chin well below forehead: upright
    assert abs(landmarks[152][0] - landmarks[10][0]) < 40


def test_a_video_avatar_is_saved_loaded_and_rendered_by_the_library(made: tuple[np.ndarray, np.ndarray, AvatarClip], tmp_path: Path) -> None:
    portrait, landmarks, clip = made
    AvatarModel("talker", portrait, landmarks, clip).save(tmp_path / "talker")
    loaded = AvatarModel.load(tmp_path / "talker")
    assert loaded.clip is not None and loaded.clip.frames == clip.frames
    assert all(np.array_equal(a, b) for a, b in zip(loaded.clip.mouths, clip.mouths))
    renderer = AvatarLibrary(tmp_path, fps=25).renderer("talker")
    assert isinstance(renderer, ClipRenderer) and renderer.size == (512, 512)
    assert np.array_equal(renderer.render(7, np.array([0.6, 0, 0])), ClipRenderer(clip).render(7, np.array([0.6, 0, 0])))


@pytest.mark.parametrize(("kind", "limits", "status", "words"), [
    ("two faces", LIMITS, 422, "2 faces"),
    ("no face", LIMITS, 422, "no face"),
    ("still mouth", LIMITS, 422, "mouth hardly moves"),
    ("short", LIMITS, 422, "needs 5–20 s"),
    ("long", ClipLimits(min_s=2.0, max_s=4.0), 422, "longer than 4 s"),
    ("huge frames", ClipLimits(min_s=5.0, max_frame_pixels=100_000), 413, "pixels a frame"),
    ("not a video", LIMITS, 415, "not a readable video"),
    ("truncated", LIMITS, 415, "not a readable video"),  # an MP4 keeps its index at the end
])
def test_bad_clips_are_refused_with_a_reason(kind: str, limits: ClipLimits, status: int, words: str, clip_bytes: bytes) -> None:
    data = {
        "two faces": lambda: talking_clip(6.0, faces=2),
        "no face": lambda: talking_clip(6.0, faces=0),
        "still mouth": lambda: talking_clip(6.0, talk=False),
        "short": lambda: talking_clip(3.0),
        "long": lambda: clip_bytes,
        "huge frames": lambda: clip_bytes,
        "not a video": lambda: b"this is not a video" * 100,
        "truncated": lambda: clip_bytes[: len(clip_bytes) // 3],
    }[kind]()
    with pytest.raises(ClipError) as e:
        make_clip(data, limits=limits)
    assert e.value.status == status and words in str(e.value), str(e.value)


async def test_a_clip_uploaded_through_the_api_is_an_avatar_a_session_talks_with(live_app) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from tests.test_server import decode_media, open_client

    data = talking_clip(10.5)
    r = httpx.post(live_app.http + "/api/avatar/add", data={"name": "talker"}, files={"file": ("talk.mp4", data)}, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["video"] is True and r.json()["width"] == 512
    listed = {a["name"]: a for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]}
    assert listed["talker"]["video"] is True and listed["default"]["video"] is False
    assert httpx.get(live_app.http + "/api/avatar/preview", params={"name": "talker"}).status_code == 200
    short = httpx.post(live_app.http + "/api/avatar/add", data={"name": "short"},
                       files={"file": ("short.mp4", talking_clip(3.0))}, timeout=120)
    assert short.status_code == 422 and "10–60 s" in short.json()["detail"]
    try:
        c = await open_client(live_app, "?avatar=talker")
        await c.send(type="user_text", text="Hello! Who are you?")
        done, _ = await c.until("turn_done", timeout=120)
        await c.ws.close()
        assert done["reason"] == "complete"
        frames, video_s, audio_s, codec = decode_media(bytes(c.media[done["turn_id"]]))
        assert codec == "h264" and frames > 10 and abs(video_s - audio_s) <= 0.040
    finally:
        import asyncio

        for _ in range(50):  # the session closes asynchronously
            if httpx.post(live_app.http + "/api/avatar/delete", json={"name": "talker"}).status_code != 409:
                break
            await asyncio.sleep(0.05)
    names = [a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]]
    assert "talker" not in names and "short" not in names


def test_the_store_holds_each_kind_to_its_own_size_limit(tmp_path: Path, clip_bytes: bytes) -> None:
    import cv2
    from skimage import data

    from avatarchat.services.avatar_store import AvatarStore, AvatarStoreError

    png = cv2.imencode(".png", data.astronaut())[1].tobytes()
    big = len(png) + len(clip_bytes)
    for name, upload, image_limit, clip_limit, words in (
        ("big-video", clip_bytes, big, len(clip_bytes) - 1, "the video is"),  # under the image limit, over its own
        ("big-image", png, len(png) - 1, big, "the image is"),
    ):
        store = AvatarStore(tmp_path / name, max_upload_bytes=image_limit, max_pixels=40_000_000, clip=LIMITS,
                            max_clip_bytes=clip_limit)
        assert store.max_upload_bytes == big  # the larger of the two: what the API lets through to the store
        with pytest.raises(AvatarStoreError) as e:
            store.add(name, upload)
        assert e.value.status == 413 and words in str(e.value), str(e.value)
        assert [a.name for a in store.list()] == ["default"]
        store.close()
