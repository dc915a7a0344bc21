"""Pipeline throughput as ratios against baselines run alternately in the same run.

(a) pipeline fps / the bare interpreter loop (set_tensor, invoke, get_tensor on one
    prepared input), same model and threads, frames from memory (640x480, resized
    by the pipeline). Goals: >= 0.95 on a ~15 ms model, >= 0.80 on a ~1 ms model.
(b) pipeline fps / a naive sequential loop (read frame, convert, resize, invoke,
    interpret, one after another) on a real video file (MJPG .avi written with
    OpenCV). Goal: >= 1.3 on 2 cores.

(d) with ``--interpreters N|auto`` (runtime.interpreters; auto also sets runtime.threads:
    auto, chosen by the calibration at load): pipeline fps on the model loaded so / the
    best bare single-interpreter loop over threads 1 and 2, each round (goal >= 1.0), and
    the same pipeline / the naive sequential loop of (b) (one interpreter of --threads),
    on video (goal >= 1.3 on the ~15 ms model; on the ~1 ms model, not below (b)).

Models come from pinned PyPI wheels (agent.zoo): MediaPipe's face_detection_short_range
(~1 ms) and pose_landmark_full (~14 ms) on one interpreter thread.

    python bench/pipeline_fps.py [--seconds 2] [--rounds 3] [--threads 1]
                                 [--interpreters N|auto [--skip-ab]] [--only NAME]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.bench import (  # noqa: E402
    Comparison,
    bare_loop_fps,
    compare,
    pipeline_fps,
    pipeline_vs_bare,
    sequential_fps,
)
from agent.config import RuntimeConfig  # noqa: E402
from agent.config import VideoSource as VideoConfig  # noqa: E402
from agent.runtime import LoadedModel, ModelFiles, load_model  # noqa: E402
from agent.runtime import calibrate as calibration  # noqa: E402
from agent.sources import pattern_frames  # noqa: E402
from agent.sources.opencv import VideoSource  # noqa: E402
from agent.sources.synthetic import MemorySource  # noqa: E402

MODELS = {"~1 ms": "face_detection_short_range.tflite", "~15 ms": "pose_landmark_full.tflite"}


def write_video(path: Path, frames: int = 300, width: int = 1280, height: int = 720) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (width, height))
    pattern = pattern_frames(width, height, 30)
    for index in range(frames):
        writer.write(cv2.cvtColor(pattern[index % 30], cv2.COLOR_RGB2BGR))
    writer.release()


def against_sequential(model: LoadedModel, video: Path, seconds: float, rounds: int) -> Comparison:
    def source() -> VideoSource:
        return VideoSource(VideoConfig(path=video, loop=True, fps=0))

    return compare(
        "pipeline",
        "sequential loop",
        lambda: pipeline_fps(model, source(), seconds),
        lambda: sequential_fps(model, source(), seconds),
        rounds,
    )


def against_best_single(
    model: LoadedModel,
    singles: list[LoadedModel],
    naive: LoadedModel,
    frames: list[np.ndarray],
    video: Path,
    seconds: float,
    rounds: int,
) -> tuple[Comparison, Comparison]:
    """(d): ``model`` (several interpreters, or calibrated) against the best bare single
    interpreter of ``singles``; then against the naive loop on ``naive``."""

    def bare_best() -> float:
        return max(bare_loop_fps(single, frames[0], seconds) for single in singles)

    bare = compare(
        "pipeline",
        "best bare single interpreter",
        lambda: pipeline_fps(model, MemorySource(frames, loop=True), seconds),
        bare_best,
        rounds,
    )

    def source() -> VideoSource:
        return VideoSource(VideoConfig(path=video, loop=True, fps=0))

    against_naive = compare(
        "pipeline",
        f"sequential loop ({naive.choice.threads} thr)",
        lambda: pipeline_fps(model, source(), seconds),
        lambda: sequential_fps(naive, source(), seconds),
        rounds,
    )
    return bare, against_naive


def show(label: str, c: Comparison, goal: float) -> None:
    verdict = "ok" if c.ratio >= goal else "BELOW GOAL"
    print(
        f"{label:34} {c.name} {c.fps:8.1f} fps / {c.baseline} {c.baseline_fps:8.1f} fps"
        f" = {c.ratio:.2f}  (goal >= {goal}: {verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interpreters", default=None, help="N or auto: adds figure (d)")
    parser.add_argument("--only", default="", help="the models whose name contains this")
    parser.add_argument("--skip-ab", action="store_true", help="figure (d) alone")
    args = parser.parse_args()
    runtime = RuntimeConfig(threads=args.threads)
    pool = None
    if args.interpreters is not None:
        auto = args.interpreters == "auto"
        pool = RuntimeConfig(
            interpreters="auto" if auto else int(args.interpreters),
            threads="auto" if auto else 1,
        )
    frames = pattern_frames(640, 480)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.avi"
        write_video(video)
        for size, name in MODELS.items():
            if args.only not in name:
                continue
            if not args.skip_ab:
                model = load_model(ModelFiles.from_file(zoo.fetch(name)), runtime)
                goal = 0.80 if size == "~1 ms" else 0.95
                show(
                    f"(a) {name[:-7]} ({size})",
                    pipeline_vs_bare(model, frames, args.seconds, args.rounds),
                    goal,
                )
                c = against_sequential(model, video, args.seconds, args.rounds)
                show(f"(b) {name[:-7]} ({size}), 720p video", c, 1.3)
                model.close()
            if pool is not None:
                files = ModelFiles.from_file(zoo.fetch(name))
                calibration.forget()
                several = load_model(files, pool)
                chosen = several.choice
                print(
                    f"(d) {name[:-7]}: {chosen.interpreters} interpreter(s) x "
                    f"{chosen.threads} thread(s) ({chosen.chosen_by})"
                )
                singles = [load_model(files, RuntimeConfig(threads=n)) for n in (1, 2)]
                naive = load_model(files, runtime)
                bare, against_naive = against_best_single(
                    several, singles, naive, frames, video, args.seconds, args.rounds
                )
                show(f"(d) {name[:-7]} ({size}), memory", bare, 1.0)
                show(f"(d) {name[:-7]} ({size}), 720p video", against_naive, 1.3)
                for loaded in (several, naive, *singles):
                    loaded.close()


if __name__ == "__main__":
    main()
