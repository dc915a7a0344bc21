"""YOLO decode + NMS time per frame against the invoke time, in the same run.

For each head (v8/v11 ``[1, 84, A]``, v5 ``[1, A, 85]``, float and int8, at 320 and
640), a generated model with exactly that output layout (agent/modelgen_yolo) runs on
the real interpreter; rounds alternate a bare invoke loop (set_tensor, invoke,
get_tensor on one prepared input) with a decode loop (the adapter's interpret on that
output: dequantise, candidates, class-aware NMS, boxes to frame pixels). Figures are
medians of the rounds: ms per frame and decode / invoke.

The generated model computes next to nothing, so its invoke is far cheaper than a real
YOLO's: decode is also set against a real ~15 ms model (pose_landmark_full from a
pinned wheel, agent.zoo) invoked in the same rounds, the cost of a small YOLO on a
desktop core (on a Pi 4 a YOLOv8n at 320 takes several times that).

Two loads: ``quiet`` (the generated model's background: nothing above min_score 0.5 but
the known boxes) and ``busy`` (min_score 0: every anchor a candidate, so 300 go into
NMS, the worst case).

    python bench/yolo_decode.py [--rounds 5] [--frames 200] [--threads 1] [--no-real]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from agent import zoo  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.modelgen_yolo import yolo_detector  # noqa: E402
from agent.runtime import LoadedModel, ModelFiles, load_model  # noqa: E402

HEADS = (  # name, version, input size, int8
    ("v8 320 float", "yolov8", 320, False),
    ("v8 640 float", "yolov8", 640, False),
    ("v8 640 int8", "yolov8", 640, True),
    ("v5 640 float", "yolov5", 640, False),
    ("v5 640 int8", "yolov5", 640, True),
)
REAL = "pose_landmark_full.tflite"


def per_frame_ms(run: Any, frames: int) -> float:
    start = time.perf_counter()
    for _ in range(frames):
        run()
    return (time.perf_counter() - start) * 1000 / frames


def measure(
    model: LoadedModel, real: LoadedModel | None, frames: int, rounds: int, min_score: float
) -> dict[str, float]:
    frame = np.full((480, 640, 3), (255, 40, 200), np.uint8)
    tensor, geometry = model.prepare(frame)
    outputs = model.infer(tensor)
    adapter = model.adapter.__class__(**{**model.adapter.__dict__, "min_score": min_score})
    real_input = None
    if real is not None:
        real_input, _ = real.prepare(frame)
    found: dict[str, list[float]] = {"invoke": [], "decode": [], "real": []}
    for _ in range(rounds):
        found["invoke"].append(per_frame_ms(lambda: model.infer(tensor), frames))
        found["decode"].append(per_frame_ms(lambda: adapter.interpret(outputs, geometry), frames))
        if real is not None:
            found["real"].append(per_frame_ms(lambda: real.infer(real_input), max(frames // 10, 5)))
    return {k: statistics.median(v) for k, v in found.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-real", action="store_true", help="skip the real ~15 ms model")
    args = parser.parse_args()
    runtime = RuntimeConfig(threads=args.threads, warmup_runs=2)
    real = None if args.no_real else load_model(ModelFiles.from_file(zoo.fetch(REAL)), runtime)
    print(
        f"{'head':14} {'load':6} {'invoke ms':>9} {'decode ms':>9} {'decode/invoke':>13}"
        + ("" if real is None else f" {'real ms':>8} {'decode/real':>11}")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, size, int8 in HEADS:
            path = Path(tmp) / f"{name.replace(' ', '_')}.tflite"
            path.write_bytes(yolo_detector(version, size, int8=int8))  # type: ignore[arg-type]
            model = load_model(ModelFiles.from_file(path, "detection"), runtime, top_k=5)
            for load, min_score in (("quiet", 0.5), ("busy", 0.0)):
                f = measure(model, real, args.frames, args.rounds, min_score)
                line = (
                    f"{name:14} {load:6} {f['invoke']:9.3f} {f['decode']:9.3f}"
                    f" {f['decode'] / f['invoke']:13.2f}"
                )
                if "real" in f:
                    line += f" {f['real']:8.2f} {f['decode'] / f['real']:11.3f}"
                print(line, flush=True)
            model.close()
    if real is not None:
        real.close()


if __name__ == "__main__":
    main()
