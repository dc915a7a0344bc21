"""A shadow run's cost on the active pipeline's fps (issue 20's "measure").

The same model serves and shadows (a second load of it: the candidate); frames from
memory (640x480, resized by the pipeline), no fps limit. Each round runs, one after
another: no shadow, a shadow at ``sample_pct`` 10 and at 100 (``max_cpu_pct`` 100: the
bound out of the way), and at 100 under the default bound (25 %). Printed: the median
fps of each and its ratio to no shadow, and the shadow's frames and skipped counts.

Models come from pinned PyPI wheels (agent.zoo): MediaPipe's face_detection_short_range
(~1 ms) and pose_landmark_full (~14 ms), one interpreter thread.

    flock /tmp/edge-bench.lock python bench/shadow_cost.py [--seconds 3] [--rounds 3]
                                                           [--only "~1 ms"]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.pipeline import Pipeline, Result  # noqa: E402
from agent.runtime import LoadedModel, ModelFiles, load_model  # noqa: E402
from agent.shadow.instruction import ShadowInstruction  # noqa: E402
from agent.shadow.run import ShadowRun  # noqa: E402
from agent.sources import pattern_frames  # noqa: E402
from agent.sources.synthetic import MemorySource  # noqa: E402

MODELS = {"~1 ms": "face_detection_short_range.tflite", "~15 ms": "pose_landmark_full.tflite"}
CASES = {  # name -> (sample_pct, max_cpu_pct), None: no shadow
    "none": None,
    "shadow 10 %": (10, 100),
    "shadow 100 %": (100, 100),
    "shadow 100 %, cpu 25 %": (100, 25),
}


def run_once(
    active: LoadedModel, candidate: LoadedModel, case: tuple[int, int] | None, seconds: float
) -> tuple[float, int, int]:
    """fps of the active pipeline, and the shadow's compared and skipped frames."""
    frames = pattern_frames(640, 480, 30)
    done: list[float] = []

    def count(result: Result) -> None:
        done.append(time.perf_counter())

    pipeline = Pipeline(MemorySource(frames, loop=True), active, count, close_model=False)
    shadow = None
    if case is not None:
        instruction = ShadowInstruction(
            active.name, 2, 0.0, "device", sample_pct=case[0], max_cpu_pct=case[1]
        )
        shadow = ShadowRun(candidate, instruction)
        pipeline.set_observers((shadow,))
    pipeline.start()
    try:
        time.sleep(seconds)
    finally:
        pipeline.stop()
    times = done[len(done) // 10 :]  # past the start
    fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else 0.0
    if shadow is None:
        return fps, 0, 0
    return fps, shadow.agreement.frames, shadow.skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=list(MODELS))
    args = parser.parse_args()
    runtime = RuntimeConfig(threads=1, warmup_runs=2)
    for label, name in MODELS.items():
        if args.only and label != args.only:
            continue
        files = ModelFiles.from_file(zoo.fetch(name))
        active, candidate = load_model(files, runtime), load_model(files, runtime)
        fps: dict[str, list[float]] = {case: [] for case in CASES}
        counts: dict[str, tuple[int, int]] = {}
        for _ in range(args.rounds):  # alternately, so drift hits every case alike
            for case, setting in CASES.items():
                value, compared, skipped = run_once(active, candidate, setting, args.seconds)
                fps[case].append(value)
                counts[case] = (compared, skipped)
        base = statistics.median(fps["none"])
        print(f"{label} model ({name}), median of {args.rounds} x {args.seconds:g} s:")
        for case in CASES:
            median = statistics.median(fps[case])
            compared, skipped = counts[case]
            extra = f"  (last round: {compared} compared, {skipped} skipped)" if compared else ""
            ratio = median / base if base else 0.0
            print(f"  {case:24} {median:8.1f} fps  ratio {ratio:.2f}{extra}")
        active.close()
        candidate.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
