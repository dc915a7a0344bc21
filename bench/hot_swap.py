"""Frames lost, and the longest gap between results, while models are hot-swapped.

A source paced at --fps (a camera's rate; frames the model cannot take in time are
dropped and counted) runs through the pipeline while a new release of the model is
loaded and warmed up beside the running one and swapped in, --swaps times. Goals: 0
frames lost, and no gap between two results longer than 2 frame intervals.

    python bench/hot_swap.py [--fps 30] [--swaps 5]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.pipeline import Pipeline, Result  # noqa: E402
from agent.runtime import ModelFiles, load_model  # noqa: E402
from agent.sources import MemorySource, pattern_frames  # noqa: E402

MODELS = ("face_detection_short_range.tflite", "pose_landmark_full.tflite")


def measure(name: str, fps: float, swaps: int, runtime: RuntimeConfig) -> None:
    path = zoo.fetch(name)

    def release(version: int) -> ModelFiles:
        return ModelFiles(name=path.stem, version=version, task="raw", cpu=path)

    done: list[tuple[float, int, int | None]] = []

    def collect(result: Result) -> None:
        done.append((time.monotonic(), result.frame, result.version))

    source = MemorySource(pattern_frames(640, 480), loop=True)  # paced to fps: like a camera
    pipeline = Pipeline(source, load_model(release(1), runtime), collect, fps=fps)
    pipeline.start()
    load_ms = []
    try:
        time.sleep(1.0)
        for version in range(2, swaps + 2):
            started = time.monotonic()
            new = load_model(release(version), runtime)  # beside the running model
            load_ms.append((time.monotonic() - started) * 1000)
            assert pipeline.swap(new)
            time.sleep(0.7)
    finally:
        pipeline.stop()
    stats = pipeline.stats()
    frames = [frame for _, frame, _ in done]
    # frames read before the last result that got none (the one in flight at stop is not lost)
    lost = len(set(range(frames[0], frames[-1] + 1)) - set(frames))
    interval = 1.0 / fps
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(done)]
    versions = sorted({v for _, _, v in done if v is not None})
    print(
        f"{name[:-7]:28} {len(frames):5} results, versions {versions[0]}..{versions[-1]}: "
        f"frames lost {lost} (dropped {stats.dropped}, errors {stats.errors}); longest gap "
        f"{max(gaps) * 1000:.1f} ms = {max(gaps) / interval:.2f} frame intervals "
        f"(goal: 0 and <= 2); load + warm-up beside {min(load_ms):.0f}-{max(load_ms):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=30)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for name in MODELS:
        measure(name, args.fps, args.swaps, RuntimeConfig(threads=args.threads))


if __name__ == "__main__":
    main()
