"""How believable the face is (issue 15): the same sentences rendered on several portraits, measured on the
output frames by MediaPipe (avatarchat.engines.avatar.quality), plus render + encode speed on one core.

    .venv/bin/python bench/bench_face.py [--portraits tests/data/portraits] [--sheets docs/faces]

Per portrait: lip-sync (loudness of the speech vs the mouth opening seen in the frames), seam (gradient on
the border of the changed region over the source's there; ~1 is seamless), the share of open-mouth frames
whose inside shows teeth or tongue, eye openness at the peak of a blink over open, and fps on one core.
Contact sheets of open-mouth and blink frames go to --sheets.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from _common import dump, machine, one_core_speech  # noqa: E402
from avatarchat.engines.avatar import quality  # noqa: E402
from avatarchat.engines.avatar.face import AvatarModel, create_avatar, default_avatar_dir  # noqa: E402
from avatarchat.engines.avatar.renderer import AvatarRenderer  # noqa: E402
from avatarchat.engines.video.fmp4 import Fmp4Stream  # noqa: E402
from avatarchat.pipeline.media import Timeline  # noqa: E402

TEXT = ("Hello there! I am your avatar, and I am happy to talk with you about anything you like. "
        "Ask me a question, and I will answer as well as I can. What would you like to know today?")
FPS, RATE = 25, 22050
OPEN = 0.35  # a frame whose opening coefficient is at least this counts as an open-mouth frame


def portraits(folder: Path) -> list[AvatarModel]:
    models = [AvatarModel.load(default_avatar_dir())]
    for path in sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        models.append(create_avatar(image, path.stem))
    return models


def measure(model: AvatarModel, audio: np.ndarray, mouth: np.ndarray) -> dict[str, object]:
    renderer = AvatarRenderer(model, fps=FPS)
    frames = [renderer.render(k, row) for k, row in enumerate(mouth)]
    rest = [renderer.render(k, np.zeros(3, np.float32)) for k in range(len(mouth))]
    with quality.FaceTracker() as tracker:
        marks = [tracker.landmarks(f) for f in frames]
    found = [i for i, m in enumerate(marks) if m is not None]
    opening = np.array([quality.mouth_opening(marks[i]) for i in found])  # type: ignore[arg-type]
    envelope = quality.loudness(audio, RATE, FPS, len(frames))[found]
    r, lag = quality.lip_sync(envelope, opening)
    open_frames = [i for i in found if mouth[i, 0] >= OPEN]
    insides = [quality.interior(frames[i], marks[i]) for i in open_frames]  # type: ignore[arg-type]
    seams = [s for i in open_frames if (s := quality.seam(frames[i], rest[i], rest[i])) is not None]
    # A blink at rest, from a still image (static mode: no tracking memory of the open eye).
    blink = max(range(renderer.idle_period_frames), key=lambda k: renderer.idle_state(k)[3])
    calm = min(range(renderer.idle_period_frames), key=lambda k: renderer.idle_state(k)[3] + abs(renderer.idle_state(k)[0]))
    with quality.FaceTracker(video=False) as still:
        shut, wide = still.landmarks(renderer.render(blink, np.zeros(3))), still.landmarks(renderer.render(calm, np.zeros(3)))
    lids = quality.eye_openness(shut) / quality.eye_openness(wide) if shut is not None and wide is not None else None
    # Render + encode on this one core: thread CPU time, so other processes do not count.
    stream = Fmp4Stream(*renderer.size, FPS, RATE, threads=1)
    stream.add_audio(np.zeros(len(mouth) * RATE // FPS, np.float32))
    cpu = time.thread_time()
    for k, row in enumerate(mouth):
        stream.add_frame(renderer.render(k, row))
        stream.take()
    fps = len(mouth) / (time.thread_time() - cpu)
    stream.close()
    sheet_open = [frames[i] for i in sorted(open_frames, key=lambda i: -mouth[i, 0])[:3]]
    return {
        "name": model.name,
        "tracked": len(found) / len(frames),
        "lip_sync_r": r, "lip_sync_lag": lag,
        "open_frames": len(open_frames),
        "textured_share": float(np.mean([x.textured for x in insides])) if insides else 0.0,
        "teeth_share": float(np.median([x.teeth for x in insides])) if insides else 0.0,
        "tongue_share": float(np.median([x.tongue for x in insides])) if insides else 0.0,
        "seam_median": float(np.median(seams)) if seams else None,
        "seam_p95": float(np.percentile(seams, 95)) if seams else None,
        "blink_lid_ratio": lids,
        "fps_one_core": fps,
        "_sheet": (model.image, sheet_open, renderer.render(blink, np.zeros(3)), model.landmarks),
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
        source, opened, blink, lm = res["_sheet"]  # type: ignore[misc]
        face_h = float(np.linalg.norm(lm[152] - lm[10]))
        s = 128 / face_h  # the same face size in every row
        scaled = [cv2.resize(f, None, fx=s * 2, fy=s * 2, interpolation=cv2.INTER_AREA) for f in (source, *opened)]
        m = lm[[13, 14]].mean(axis=0) * s * 2
        mouths.append(np.hstack([crop(f, m, 80, 48, 1) for f in scaled]))
        e = lm[[33, 263]].mean(axis=0) * s * 2
        both = [cv2.resize(f, None, fx=s * 2, fy=s * 2, interpolation=cv2.INTER_AREA) for f in (source, blink)]
        eyes.append(np.hstack([crop(f, e, 110, 36, 1) for f in both]))
    for name, rows in (("mouths.png", mouths), ("blinks.png", eyes)):
        width = max(r.shape[1] for r in rows)
        rows = [cv2.copyMakeBorder(r, 0, 4, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255)) for r in rows]
        cv2.imwrite(str(folder / name), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--portraits", type=Path, default=Path("tests/data/portraits"))
    ap.add_argument("--sheets", type=Path, default=None, help="write contact sheets here (e.g. docs/faces)")
    args = ap.parse_args()
    speech = one_core_speech(TEXT)
    piece = Timeline(FPS, RATE).prepare(speech)
    results = [measure(m, piece.audio, piece.mouth) for m in portraits(args.portraits)]
    print(f"machine: {machine()}; {piece.frames} frames of speech per portrait, 512×512, render + encode on 1 core")
    print(f"{'portrait':<16}{'tracked':>8}{'lipsync r':>10}{'lag':>5}{'open':>6}{'textured':>9}{'teeth':>7}"
          f"{'tongue':>7}{'seam p50':>9}{'p95':>6}{'blink':>7}{'fps':>7}")
    for res in results:
        f = lambda k, fmt: "–" if res[k] is None else format(res[k], fmt)  # noqa: E731
        print(f"{res['name']:<16}{f('tracked', '.2f'):>8}{f('lip_sync_r', '.2f'):>10}{res['lip_sync_lag']:>5}"
              f"{res['open_frames']:>6}{f('textured_share', '.2f'):>9}{f('teeth_share', '.2f'):>7}"
              f"{f('tongue_share', '.2f'):>7}{f('seam_median', '.2f'):>9}{f('seam_p95', '.2f'):>6}"
              f"{f('blink_lid_ratio', '.2f'):>7}{f('fps_one_core', '.0f'):>7}")
    if args.sheets:
        sheets(results, args.sheets)
        print(f"contact sheets: {args.sheets}/mouths.png, {args.sheets}/blinks.png")
    dump("face", {"machine": machine(), "portraits": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]})


if __name__ == "__main__":
    main()
