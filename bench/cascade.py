"""A cascade's cost: pipeline fps with a second model on 1 and on 4 crops per frame
against the same pipeline without it, alternated in the same rounds.

The first model is a generated YOLOv8 head at 320 (agent/modelgen_yolo: four known boxes
on the test pattern at min_score 0.2, decoded and NMS'd on the device); frames are
480x480 from memory, played as fast as possible. The second model runs on each chosen
crop (cut from the frame, resized to its input): the generated colour classifier
(``tiny``, next to no invoke: the cascade's own overhead, crop and resize) and, unless
``--no-real``, MediaPipe's face_detection_short_range (``~1 ms``, from a pinned wheel,
agent.zoo), the size of a small classifier or landmark model.

    python bench/cascade.py [--seconds 2] [--rounds 3] [--threads 1] [--no-real]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.bench import pipeline_fps  # noqa: E402
from agent.cascade import Cascade, CascadeRules  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.frames import Result  # noqa: E402
from agent.modelgen import colour_classifier  # noqa: E402
from agent.modelgen_yolo import yolo_detector  # noqa: E402
from agent.pipeline import Pipeline  # noqa: E402
from agent.runtime import LoadedModel, ModelFiles, load_model  # noqa: E402
from agent.sources import pattern_frames  # noqa: E402
from agent.sources.synthetic import MemorySource  # noqa: E402


def cascade_fps(
    model: LoadedModel, cascade: Cascade, frames: list[np.ndarray], seconds: float
) -> tuple[float, float]:
    """Results per second of the pipeline with ``cascade`` as its stage, and crops per
    frame (run ÷ results)."""
    done = [0]
    first: list[float] = []

    def count(result: Result) -> None:
        if not first:
            first.append(time.perf_counter())
        done[0] += 1

    crops_before = cascade.stats().crops
    pipeline = Pipeline(MemorySource(frames, loop=True), model, count, close_model=False)
    pipeline.set_stages((cascade,))
    pipeline.start()
    try:
        time.sleep(seconds)
        ended, results = time.perf_counter(), done[0]
    finally:
        pipeline.stop()
    crops = cascade.stats().crops - crops_before
    fps = (results - 1) / (ended - first[0]) if results > 1 else 0.0
    return fps, crops / max(results, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-real", action="store_true", help="the generated second model only")
    args = parser.parse_args()
    runtime = RuntimeConfig(threads=args.threads)
    frames = pattern_frames(480, 480)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "yolo.tflite").write_bytes(yolo_detector("yolov8", 320))
        (root / "tiny.tflite").write_bytes(colour_classifier(size=64))
        primary = load_model(
            ModelFiles("yolo", 1, "detection", cpu=root / "yolo.tflite"), runtime, min_score=0.2
        )
        found = primary.run(frames[0]).detections
        print(f"primary: generated YOLOv8 320, {len(found)} detections per frame at 480x480")
        seconds = {"tiny": ModelFiles("tiny", 1, "classification", cpu=root / "tiny.tflite")}
        if not args.no_real:
            real = zoo.fetch("face_detection_short_range.tflite")
            seconds["~1 ms"] = ModelFiles("face", 1, "raw", cpu=real)
        for label, files in seconds.items():
            second = load_model(files, runtime)
            cascades = {n: Cascade(second, CascadeRules(max_crops=n, min_size=8)) for n in (1, 4)}
            bare: list[float] = []
            fps: dict[int, list[float]] = {1: [], 4: []}
            per_frame: dict[int, float] = {}
            for _ in range(args.rounds):
                bare.append(pipeline_fps(primary, MemorySource(frames, loop=True), args.seconds)[0])
                for n, cascade in cascades.items():
                    rate, per_frame[n] = cascade_fps(primary, cascade, frames, args.seconds)
                    fps[n].append(rate)
            base = statistics.median(bare)
            p50 = cascades[4].stats().infer_ms_p50
            print(f"second model {label} (one crop: {p50:.2f} ms p50): without {base:7.1f} fps")
            for n in (1, 4):
                with_it = statistics.median(fps[n])
                print(
                    f"  {n} crop(s) per frame ({per_frame[n]:.1f} run): {with_it:7.1f} fps"
                    f" = {with_it / base:.2f} of without"
                )
            second.close()
        primary.close()


if __name__ == "__main__":
    main()
