"""How believable the face is (issue 15): the same sentences rendered on several portraits, measured on the
output frames by MediaPipe (avatarchat.engines.avatar.quality), plus render + encode speed on one core.

    .venv/bin/python bench/bench_face.py [--portraits tests/data/portraits] [--clip talk.mp4 ...] [--sheets docs/faces]

Per portrait: lip-sync (loudness of the speech vs the mouth opening seen in the frames), seam (gradient on
the border of the changed region over the source's there; ~1 is seamless), the share of open-mouth frames
whose inside shows teeth or tongue, eye openness at the peak of a blink over open, and fps on one core.
Contact sheets of open-mouth and blink frames go to --sheets. Video avatars: each --clip, or without one a
clip made from the Grace Hopper portrait talking (tests/support/faces.py; no public-domain talking-head video
can be installed here); their blinks are the clip's own (lid ratio: the least open over the median).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support.faces

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from _common import dump, machine, one_core_speech  # noqa: E402
from avatarchat.engines.avatar import quality  # noqa: E402
from avatarchat.engines.avatar.base import AvatarRendererProtocol  # noqa: E402
from avatarchat.engines.avatar.clip import ClipLimits, ClipRenderer, make_clip  # noqa: E402
from avatarchat.engines.avatar.face import AvatarModel, create_avatar, default_avatar_dir  # noqa: E402
from avatarchat.engines.avatar.renderer import AvatarRenderer  # noqa: E402
from avatarchat.engines.video.fmp4 import Fmp4Stream  # noqa: E402
from avatarchat.pipeline.media import Timeline  # noqa: E402

TEXT = ("Hello there! I am your avatar, and I am happy to talk with you about anything you like. "
        "Ask me a question, and I will answer as well as I can. What would you like to know today?")
FPS, RATE = 25, 22050
OPEN = 0.35  # a frame whose opening coefficient is at least this counts as an open-mouth frame


def portraits(folder: Path) -> list[AvatarModel]:
    """The default avatar and each photo in ``folder``; each also with much darker skin (a recolouring: no
    such public-domain photo is installable), and the photos also a stop and a half darker (poor light)."""
    from tests.support.faces import darker_skin

    default = AvatarModel.load(default_avatar_dir())
    models = [default, create_avatar(darker_skin(default.image), "default_dark")]
    for path in sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        models.append(create_avatar(image, path.stem))
        models.append(create_avatar(darker_skin(image), path.stem + "_dark"))
        dim = np.clip(image.astype(np.float32) * 0.4, 0, 255).astype(np.uint8)
        models.append(create_avatar(dim, path.stem + "_dim"))
    return models


def lids(renderer: AvatarRendererProtocol) -> tuple[float | None, float, float, np.ndarray, np.ndarray]:
    """At the deepest blink against eyes open: MediaPipe's eye openness (shut over open), the share of the
    open eye's area that shows skin (open, shut), and the two frames."""
    rest = np.zeros(3, np.float32)
    if isinstance(renderer, AvatarRenderer):  # the renderer's own blink
        blink = max(range(renderer.idle_period_frames), key=lambda k: renderer.idle_state(k)[3])
        calm = min(range(renderer.idle_period_frames),
                   key=lambda k: renderer.idle_state(k)[3] + abs(renderer.idle_state(k)[0]))
        shut, wide = renderer.render(blink, rest), renderer.render(calm, rest)
    else:  # a clip: its own blinks, somewhere in the loop
        frames = list(renderer.idle_frames())
        eyes = np.array([quality.eye_openness(m) if m is not None else np.nan for m in quality.track(frames)])
        shut, wide = frames[int(np.nanargmin(eyes))], frames[int(np.nanargmax(eyes))]
    with quality.FaceTracker(video=False) as still:
        a, b = still.landmarks(shut), still.landmarks(wide)
    if a is None or b is None:
        return None, 0.0, 0.0, wide, shut
    return quality.eye_openness(a) / quality.eye_openness(b), quality.lid_cover(wide, b), quality.lid_cover(shut, b), wide, shut


def measure(name: str, renderer: AvatarRendererProtocol, audio: np.ndarray, mouth: np.ndarray) -> dict[str, object]:
    frames = [renderer.render(k, row) for k, row in enumerate(mouth)]
    rest = [renderer.render(k, np.zeros(3, np.float32)) for k in range(len(mouth))]
    marks = quality.track(frames)
    found = [i for i, m in enumerate(marks) if m is not None]
    opening = np.array([quality.mouth_opening(marks[i]) for i in found])  # type: ignore[arg-type]
    envelope = quality.loudness(audio, RATE, FPS, len(frames))[found]
    r, lag = quality.lip_sync(envelope, opening)
    open_frames = [i for i in found if mouth[i, 0] >= OPEN]
    insides = [quality.interior(frames[i], marks[i]) for i in open_frames]  # type: ignore[arg-type]
    seams = [s for i in open_frames if (s := quality.seam(frames[i], rest[i], rest[i])) is not None]
    lid_ratio, cover_open, cover_shut, wide, shut = lids(renderer)
    # Render + encode on this one core: thread CPU time, so other processes do not count; median of 5 passes.
    passes = []
    for _ in range(5):
        stream = Fmp4Stream(*renderer.size, FPS, RATE, threads=1)
        stream.add_audio(np.zeros(len(mouth) * RATE // FPS, np.float32))
        cpu = time.thread_time()
        for k, row in enumerate(mouth):
            stream.add_frame(renderer.render(k, row))
            stream.take()
        passes.append(len(mouth) / (time.thread_time() - cpu))
        stream.close()
    fps = float(np.median(passes))
    lm = marks[found[0]]
    return {
        "name": name,
        "tracked": len(found) / len(frames),
        "lip_sync_r": r, "lip_sync_lag": lag,
        "open_frames": len(open_frames),
        "textured_share": float(np.mean([x.textured for x in insides])) if insides else 0.0,
        "teeth_share": float(np.median([x.teeth for x in insides])) if insides else 0.0,
        "tongue_share": float(np.median([x.tongue for x in insides])) if insides else 0.0,
        "seam_median": float(np.median(seams)) if seams else None,
        "seam_p95": float(np.percentile(seams, 95)) if seams else None,
        "blink_lid_ratio": lid_ratio,
        "lid_cover_open": cover_open, "lid_cover_shut": cover_shut,
        "fps_one_core": fps,
        "_sheet": (rest[0], [frames[i] for i in sorted(open_frames, key=lambda i: -mouth[i, 0])[:3]], wide, shut, lm),
    }


def crop(image: np.ndarray, centre: np.ndarray, half_w: int, half_h: int, scale: int = 2) -> np.ndarray:
    x, y = int(centre[0]), int(centre[1])
    pad = cv2.copyMakeBorder(image, half_h, half_h, half_w, half_w, cv2.BORDER_REPLICATE)
    part = pad[y : y + 2 * half_h, x : x + 2 * half_w]
    return cv2.resize(part, (2 * half_w * scale, 2 * half_h * scale), interpolation=cv2.INTER_CUBIC)


def sheets(results: list[dict[str, object]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mouths, eyes = [], []
    for res in results:
        source, opened, wide, blink, lm = res["_sheet"]  # type: ignore[misc]
        face_h = float(np.linalg.norm(lm[152] - lm[10]))
        s = 128 / face_h  # the same face size in every row
        scaled = [cv2.resize(f, None, fx=s * 2, fy=s * 2, interpolation=cv2.INTER_AREA) for f in (source, *opened)]
        m = lm[[13, 14]].mean(axis=0) * s * 2
        mouths.append(np.hstack([crop(f, m, 80, 48, 1) for f in scaled]))
        e = lm[[33, 263]].mean(axis=0) * s * 2
        both = [cv2.resize(f, None, fx=s * 2, fy=s * 2, interpolation=cv2.INTER_AREA) for f in (wide, blink)]
        eyes.append(np.hstack([crop(f, e, 110, 36, 1) for f in both]))
    for name, rows in (("mouths.jpg", mouths), ("blinks.jpg", eyes)):
        width = max(r.shape[1] for r in rows)
        rows = [cv2.copyMakeBorder(r, 0, 4, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255)) for r in rows]
        cv2.imwrite(str(folder / name), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--portraits", type=Path, default=Path("tests/data/portraits"))
    ap.add_argument("--clip", type=Path, action="append", default=[], help="a video avatar's clip (repeatable)")
    ap.add_argument("--no-clip", action="store_true", help="portraits only (e.g. against an older renderer)")
    ap.add_argument("--sheets", type=Path, default=None, help="write contact sheets here (e.g. docs/faces)")
    args = ap.parse_args()
    clips = [(p.stem, p.read_bytes()) for p in args.clip]
    if not clips and not args.no_clip:
        from tests.support.faces import talking_clip

        clips = [("hopper_clip", talking_clip(30.0))]
    speech = one_core_speech(TEXT)
    piece = Timeline(FPS, RATE).prepare(speech)
    results = [measure(m.name, AvatarRenderer(m, fps=FPS), piece.audio, piece.mouth) for m in portraits(args.portraits)]
    for name, data in clips:
        start = time.process_time()
        *_, clip = make_clip(data, FPS, limits=ClipLimits())
        print(f"{name}: {clip.frames / FPS:.1f} s clip made into a video avatar in {time.process_time() - start:.1f} s of CPU")
        results.append(measure(name, ClipRenderer(clip, fps=FPS), piece.audio, piece.mouth))
    print(f"machine: {machine()}; {piece.frames} frames of speech per portrait, 512×512, render + encode on 1 core")
    print(f"{'portrait':<16}{'tracked':>8}{'lipsync r':>10}{'lag':>5}{'open':>6}{'textured':>9}{'teeth':>7}"
          f"{'tongue':>7}{'seam p50':>9}{'p95':>6}{'blink':>7}{'lids':>10}{'fps':>7}")
    for res in results:
        f = lambda k, fmt: "–" if res[k] is None else format(res[k], fmt)  # noqa: E731
        print(f"{res['name']:<16}{f('tracked', '.2f'):>8}{f('lip_sync_r', '.2f'):>10}{res['lip_sync_lag']:>5}"
              f"{res['open_frames']:>6}{f('textured_share', '.2f'):>9}{f('teeth_share', '.2f'):>7}"
              f"{f('tongue_share', '.2f'):>7}{f('seam_median', '.2f'):>9}{f('seam_p95', '.2f'):>6}"
              f"{f('blink_lid_ratio', '.2f'):>7}{res['lid_cover_open']:>5.2f}→{res['lid_cover_shut']:.2f}"
              f"{f('fps_one_core', '.0f'):>7}")
    if args.sheets:
        sheets(results, args.sheets)
        print(f"contact sheets: {args.sheets}/mouths.jpg, {args.sheets}/blinks.jpg")
    dump("face", {"machine": machine(), "portraits": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]})


if __name__ == "__main__":
    main()
