"""Two pipelines in one process against two bare interpreter loops, in the same run.

Two models from pinned PyPI wheels (agent.zoo): MediaPipe's face_detection_short_range
(~1 ms) and pose_landmark_full (~14 ms), each on one interpreter of ``--threads``
threads, frames from memory (640x480, resized by each pipeline). Each round, alternately:

- the baseline: the two bare loops (set_tensor, invoke, get_tensor on one prepared
  input) at the same time, one thread each: what the cores give the two models with
  no capture, preparation, interpretation or publishing;
- two ``Pipeline``s at the same time (as ``pipelines:`` runs them), each on its own
  in-memory source at ``fps: 0`` (as fast as inference takes frames).

Printed: each model's fps in both (medians over the rounds), each model's ratio
(pipeline / bare loop), and the ratio of the sums of the two models' *shares*
(fps / that model's bare fps alone, measured once): 1.0 means the two pipelines do
together what two bare loops do; the goal is >= 0.85 on 2 cores.

Frames are resized with OpenCV as beside a camera or video source (``--resize numpy``:
as beside a synthetic or sensor source, which load no OpenCV).

    python bench/two_pipelines.py [--seconds 3] [--rounds 3] [--threads 1] [--resize numpy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.bench import bare_loop_fps  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.pipeline import Pipeline, Result  # noqa: E402
from agent.runtime import LoadedModel, ModelFiles, load_model  # noqa: E402
from agent.sources import pattern_frames  # noqa: E402
from agent.sources.synthetic import MemorySource  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

MODELS = ("face_detection_short_range.tflite", "pose_landmark_full.tflite")


def bare_pair(models: list[LoadedModel], frame: np.ndarray, seconds: float) -> list[float]:
    """The bare loops of both models at the same time, one thread each."""
    fps = [0.0, 0.0]

    def run(index: int) -> None:
        fps[index] = bare_loop_fps(models[index], frame, seconds)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return fps


def pipeline_pair(
    models: list[LoadedModel], frames: list[np.ndarray], seconds: float
) -> list[float]:
    """Two pipelines at the same time; each one's results per second."""
    counts: list[list[float]] = [[0, 0.0, 0.0], [0, 0.0, 0.0]]  # results, first, last

    def counter(index: int) -> Callable[[Result], None]:
        def count(result: Result) -> None:
            now = time.perf_counter()
            entry = counts[index]
            if entry[0] == 0:
                entry[1] = now
            entry[0] += 1
            entry[2] = now

        return count

    pipelines = [
        Pipeline(MemorySource(frames, loop=True), model, counter(i), close_model=False)
        for i, model in enumerate(models)
    ]
    for pipeline in pipelines:
        pipeline.start()
    try:
        time.sleep(seconds)
        done = [list(entry) for entry in counts]
    finally:
        for pipeline in pipelines:
            pipeline.stop()
    return [
        (count - 1) / (last - first) if count > 1 and last > first else 0.0
        for count, first, last in done
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--resize",
        choices=("opencv", "numpy"),
        default="opencv",
        help="opencv: as beside a camera or video source (they load OpenCV, and the "
        "pipelines resize with it); numpy: as beside a synthetic or sensor source",
    )
    args = parser.parse_args()
    if args.resize == "opencv":
        import cv2  # noqa: F401  # agent/runtime/resize.py resizes with it once loaded
    print(f"resize: {args.resize}")
    runtime = RuntimeConfig(threads=args.threads)
    models = [load_model(ModelFiles.from_file(zoo.fetch(name)), runtime) for name in MODELS]
    frames = pattern_frames(640, 480)
    try:
        alone = [bare_loop_fps(model, frames[0], args.seconds) for model in models]
        bare: list[list[float]] = []
        piped: list[list[float]] = []
        for _ in range(args.rounds):
            bare.append(bare_pair(models, frames[0], args.seconds))
            piped.append(pipeline_pair(models, frames, args.seconds))
    finally:
        for model in models:
            model.close()
    names = [name.removesuffix(".tflite") for name in MODELS]
    bare_med = [statistics.median(r[i] for r in bare) for i in range(2)]
    pipe_med = [statistics.median(r[i] for r in piped) for i in range(2)]
    for i, name in enumerate(names):
        print(
            f"{name}: alone {alone[i]:.1f} fps; beside the other: bare loop "
            f"{bare_med[i]:.1f} fps, pipeline {pipe_med[i]:.1f} fps "
            f"(ratio {pipe_med[i] / bare_med[i]:.2f})"
        )
    share_bare = sum(bare_med[i] / alone[i] for i in range(2))
    share_pipe = sum(pipe_med[i] / alone[i] for i in range(2))
    ratio = share_pipe / share_bare
    print(
        f"shares of each model's solo rate: two bare loops {share_bare:.2f}, "
        f"two pipelines {share_pipe:.2f}; ratio {ratio:.2f} (goal >= 0.85)"
    )


if __name__ == "__main__":
    main()
