"""Render + H.264/fMP4 encode throughput at 512×512 on ONE core (the pipeline's per-frame CPU cost).

    .venv/bin/python bench/bench_render_encode.py [--frames 1000] [--runs 5] [--video [clip.mp4]]

--video: a video avatar (engines/avatar/clip.py) made from the clip, or without one from the Grace Hopper
portrait talking (tests/support/faces.py); issue 15's targets: ≥ 150 fps a portrait, ≥ 100 fps a video.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

from _common import dump, machine, one_core_speech  # noqa: E402
from avatarchat.engines.avatar.base import AvatarRendererProtocol  # noqa: E402
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir  # noqa: E402
from avatarchat.engines.avatar.frame_cache import FrameCache  # noqa: E402
from avatarchat.engines.avatar.renderer import AvatarRenderer  # noqa: E402
from avatarchat.engines.avatar.visemes import mouth_track  # noqa: E402
from avatarchat.engines.video.fmp4 import Fmp4Stream  # noqa: E402

TEXT = ("Hello there! I am your avatar, and I am happy to talk with you about anything you like. "
        "Ask me a question, and I will answer as well as I can.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--video", nargs="?", const="", default=None, help="a video avatar (optionally from this clip)")
    args = ap.parse_args()
    model = AvatarModel.load(default_avatar_dir())
    renderer: AvatarRendererProtocol = AvatarRenderer(model)
    if args.video is not None:
        import sys
        from pathlib import Path

        from avatarchat.engines.avatar.clip import ClipLimits, ClipRenderer, make_clip

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.support.faces import talking_clip

        data = Path(args.video).read_bytes() if args.video else talking_clip(20.0)
        renderer = ClipRenderer(make_clip(data, limits=ClipLimits())[2])
    speech = one_core_speech(TEXT)
    n_speech = int(speech.duration * 25)
    mouth = mouth_track(speech, 25, n_speech)
    mouth = np.concatenate([mouth] * (args.frames // n_speech + 1))[: args.frames]
    kind = "video avatar" if args.video is not None else "portrait"
    print(f"machine: {machine()}; pinned to 1 core; {args.runs} runs × {args.frames} frames at 512×512, {kind}")
    variants = {kind: renderer}
    if args.video is None:
        # The server keeps the idle frames in I420 (engines/avatar/frame_cache.py); its first pass over the 8 s
        # loop renders them, later ones reuse them. The renderer without the cache, in RGB, is the baseline.
        variants = {"portrait, idle frames cached, I420": AvatarRenderer(model, cache=FrameCache(256 << 20)),
                    "portrait, no cache, RGB (baseline)": renderer}
    results: dict[str, tuple[np.ndarray, np.ndarray, list[float]]] = {name: (np.zeros(0), np.zeros(0), [])
                                                                      for name in variants}
    for _ in range(args.runs):  # interleaved, so that the machine's noise hits both alike
        for name, each in variants.items():
            r, e, fps = measure(each, mouth, args.frames, i420="I420" in name)
            old_r, old_e, runs = results[name]
            results[name] = (np.concatenate([old_r, r]), np.concatenate([old_e, e]), [*runs, fps])
    report = {}
    for name, (r, e, fps_runs) in results.items():
        both = r + e
        print(f"-- {name}")
        print(f"render        median {np.median(r):.2f} ms  p95 {np.percentile(r, 95):.2f} ms")
        print(f"encode        median {np.median(e):.2f} ms  p95 {np.percentile(e, 95):.2f} ms")
        print(f"render+encode median {np.median(both):.2f} ms  p95 {np.percentile(both, 95):.2f} ms"
              f"  → {1000 / np.median(both):.0f} fps (median per frame)")
        print(f"throughput per run: median {np.median(fps_runs):.0f} fps, worst {min(fps_runs):.0f} fps  "
              f"(target ≥ {100 if args.video is not None else 150})")
        report[name] = {"render_ms": {"p50": float(np.median(r)), "p95": float(np.percentile(r, 95))},
                        "encode_ms": {"p50": float(np.median(e)), "p95": float(np.percentile(e, 95))},
                        "fps_runs": fps_runs}
    if len(results) == 2:
        (_, (_, _, new)), (_, (_, _, old)) = results.items()
        print(f"cached / baseline throughput: {np.median(new) / np.median(old):.2f}×")
    dump("render_encode", report)


def measure(renderer: AvatarRendererProtocol, mouth: np.ndarray, frames: int,
            i420: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """One run: per-frame render and encode times (ms) and the run's frames per second. ``i420``: as the server
    renders a portrait (``render_yuv``, the encoder's format; pipeline/media.py)."""
    render_ms: list[float] = []
    encode_ms: list[float] = []
    stream = Fmp4Stream(512, 512, 25, 22050, threads=1)
    stream.add_audio(np.zeros(frames * 882, np.float32))
    start = time.perf_counter()
    for i, row in enumerate(mouth):
        t0 = time.perf_counter()
        frame = renderer.render_yuv(i, row) if i420 else renderer.render(i, row)  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        if i420:
            stream.add_yuv(frame)
        else:
            stream.add_frame(frame)
        stream.take()
        t2 = time.perf_counter()
        render_ms.append((t1 - t0) * 1000)
        encode_ms.append((t2 - t1) * 1000)
    stream.close()
    return np.array(render_ms), np.array(encode_ms), frames / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
