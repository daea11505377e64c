"""The Wav2Lip engine's cost per frame on ONE core, through the pipeline's render_batch, at 512×512.

Without --model it runs tests/support/wav2lip_model.py's tiny ONNX model (same inputs and output as Wav2Lip,
almost no arithmetic): the figure is then the PLUMBING cost only (warp base frame, mel windows, crops,
ONNX Runtime call, resize and blend, encode), not Wav2Lip's. With --model wav2lip_gan.onnx it measures the
real network.

    .venv/bin/python bench/bench_wav2lip.py [--model FILE] [--frames 500] [--runs 3] [--batch 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import dump, machine, one_core_speech  # noqa: E402
from avatarchat.engines.avatar.face import AvatarModel, default_avatar_dir  # noqa: E402
from avatarchat.engines.avatar.wav2lip import Wav2LipRenderer, load_model  # noqa: E402
from avatarchat.engines.video.fmp4 import Fmp4Stream  # noqa: E402
from avatarchat.pipeline.media import Timeline, render_batch, speech_track  # noqa: E402
from tests.support import wav2lip_model  # noqa: E402

TEXT = ("Hello there! I am your avatar, and I am happy to talk with you about anything you like. "
        "Ask me a question, and I will answer as well as I can.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a Wav2Lip ONNX file (default: the tiny plumbing model)")
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5, help="frames per render batch (pipeline.render_batch_frames)")
    args = ap.parse_args()
    speech = one_core_speech(TEXT)
    path = Path(args.model) if args.model else wav2lip_model.build(Path(tempfile.mkdtemp()) / "tiny.onnx")
    renderer = Wav2LipRenderer(AvatarModel.load(default_avatar_dir()), load_model(path, threads=1),
                               batch_size=max(8, args.batch))
    piece = Timeline(25, 22050).prepare(speech)
    reps = args.frames // piece.frames + 1
    mouth = np.concatenate([piece.mouth] * reps)[: args.frames]
    audio = np.concatenate([piece.audio] * reps)[: args.frames * 882]
    def run_once(with_speech: bool, encode: bool) -> tuple[float, float]:
        """(fps by the wall clock, fps per CPU-second of this process): the second holds on a busy machine."""
        r = renderer if with_speech else renderer.base
        stream = Fmp4Stream(512, 512, 25, 22050, threads=1)
        track = speech_track(r, 22050, 25)
        if track is not None:
            track.push(audio)
            track.begin(0)
        start, cpu = time.perf_counter(), time.process_time()
        for k in range(0, args.frames, args.batch):
            rows = mouth[k : k + args.batch]
            if encode:
                render_batch(stream, r, rows, k, None, speech=track)
            elif track is not None:
                renderer.render_speech(list(range(k, k + len(rows))), rows, track)
            else:
                for i, row in enumerate(rows):
                    r.render(k + i, row)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        stream.abort()
        return args.frames / wall, args.frames / cpu

    # Interleaved, so a busy machine weighs on both engines alike.
    names = ("wav2lip_render", "warp_render", "wav2lip_render_encode", "warp_render_encode")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.runs):
        for name in names:
            w, c = run_once(name.startswith("wav2lip"), name.endswith("encode"))
            wall[name].append(w)
            cpu[name].append(c)
    what = f"model {path.name}" if args.model else "the tiny plumbing model (NOT Wav2Lip's cost)"
    print(f"machine: {machine()}; pinned to 1 core; {what}; {args.runs} runs × {args.frames} frames at 512×512, "
          f"{args.batch} frames per batch")
    for name in names:
        c = float(np.median(cpu[name]))
        print(f"{name:22s} per CPU-second: median {c:4.0f} fps ({1000 / c:5.2f} ms/frame); "
              f"wall clock: median {np.median(wall[name]):4.0f} fps, best {max(wall[name]):4.0f}")
    dump("wav2lip" if args.model else "wav2lip_plumbing", {"model": str(path.name), "batch": args.batch,
                                                           "fps_per_cpu_second": cpu, "fps_wall": wall})


if __name__ == "__main__":
    main()
