"""``edge-agent infer`` and ``edge-agent bench``: a model file, no daemon, no store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ModelError
from agent.runtime import InputNorm, LoadedModel, ModelFiles, load_model
from agent.runtime.adapters import TASKS, detection_outputs

if TYPE_CHECKING:
    import numpy as np

    from agent.config import RuntimeConfig
    from agent.pipeline import Result

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def open_model(
    path: Path,
    task: str,
    labels: Path | None,
    runtime: RuntimeConfig,
    top_k: int,
    min_score: float,
    mean: float | None,
    std: float | None,
) -> LoadedModel:
    """Load one model file. ``task`` "auto": detection for the 4 SSD outputs,
    classification when labels are given, else raw."""
    norm = InputNorm()
    if mean is not None or std is not None:
        norm = InputNorm(mean if mean is not None else 0.0, std or 255.0, explicit=True)
    if task == "auto":
        raw = load_model(ModelFiles.from_file(path, "raw", labels, norm), runtime, top_k, min_score)
        task = "raw"
        try:
            detection_outputs(raw.backend.outputs)
            task = "detection"
        except ModelError:
            if labels is not None:
                task = "classification"
        if task == "raw":
            return raw
        raw.close()
    return load_model(ModelFiles.from_file(path, task, labels, norm), runtime, top_k, min_score)


def _read_image(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ModelError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def infer(model: LoadedModel, inputs: list[Path], as_json: bool) -> int:
    """Run ``model`` on images (one result each) or videos (every frame). Prints results."""
    from agent.config import VideoSource as VideoConfig
    from agent.pipeline import Pipeline
    from agent.sources.opencv import VideoSource

    def show(name: str, result: Result | None, output: Any, ms: float | None = None) -> None:
        if as_json:
            data = result.to_dict() if result is not None else output.to_dict()
            print(json.dumps({"input": name, **data}), flush=True)
        else:
            timing = f"  ({ms:.1f} ms)" if ms is not None else ""
            print(f"{name}: {output.summary()}{timing}", flush=True)

    for path in inputs:
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            show(str(path), None, model.run(_read_image(path)))
            continue
        source = VideoSource(VideoConfig(path=path, fps=0))

        def emit(result: Result, name: str = str(path)) -> None:
            show(f"{name}#{result.frame}", result, result.output, result.infer_ms)

        pipeline = Pipeline(source, model, emit, close_model=False)
        pipeline.start()
        try:
            pipeline.wait()
        finally:
            pipeline.stop()
        stats = pipeline.stats()
        print(
            f"{path}: {stats.results} frames, {stats.errors} errors, "
            f"inference p50 {stats.infer_ms_p50:.1f} ms",
            file=sys.stderr,
        )
    return 0


def bench(model: LoadedModel, seconds: float, rounds: int, as_json: bool) -> int:
    """Pipeline fps against the bare interpreter loop, on 640x480 frames from memory."""
    from agent.bench import pipeline_vs_bare
    from agent.sources import pattern_frames

    comparison = pipeline_vs_bare(model, pattern_frames(640, 480), seconds, rounds)
    stats = comparison.stats
    data = {
        "model": model.name,
        "backend": model.backend_name,
        "task": model.files.task,
        "input": list(model.input.shape),
        "bare_fps": round(comparison.baseline_fps, 1),
        "pipeline_fps": round(comparison.fps, 1),
        "ratio": round(comparison.ratio, 3),
        **(
            {}
            if stats is None
            else {
                "latency_ms_p50": round(stats.latency_ms_p50, 2),
                "latency_ms_p95": round(stats.latency_ms_p95, 2),
                "latency_ms_p99": round(stats.latency_ms_p99, 2),
                "infer_ms_p50": round(stats.infer_ms_p50, 2),
            }
        ),
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{model.name} on the {model.backend_name}, input {list(model.input.shape)}")
    print(f"  bare interpreter loop  {comparison.baseline_fps:8.1f} fps")
    print(f"  pipeline               {comparison.fps:8.1f} fps  ({comparison.ratio:.2f} of bare)")
    if stats is not None:
        print(
            f"  latency p50/p95/p99    {stats.latency_ms_p50:.2f} / {stats.latency_ms_p95:.2f}"
            f" / {stats.latency_ms_p99:.2f} ms (capture to result); "
            f"inference p50 {stats.infer_ms_p50:.2f} ms"
        )
    return 0


TASK_CHOICES = ("auto", *TASKS)
