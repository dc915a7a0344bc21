"""``edge-agent infer`` and ``edge-agent bench``: a model file, no daemon, no store."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ModelError
from agent.preflight import missing_library
from agent.runtime import InputNorm, LoadedModel, ModelFiles, load_model
from agent.runtime.adapters import TASKS, detection_outputs
from agent.runtime.yolo import DEFAULT_IOU, is_yolo_head
from agent.strictjson import dumps

if TYPE_CHECKING:
    import numpy as np

    from agent.config import RuntimeConfig
    from agent.pipeline import Reload, Result

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
    """Load one model file. ``task`` "auto": detection for the 4 SSD outputs or a YOLO
    head (one output with the anchors of the input's size), classification when labels
    are given, else raw."""
    norm = InputNorm()
    if mean is not None or std is not None:
        norm = InputNorm(0.0 if mean is None else mean, 255.0 if std is None else std, True)
    files = ModelFiles.from_file(path, "raw" if task == "auto" else task, labels, norm)
    model = load_model(files, runtime, top_k, min_score)
    if task == "auto":
        try:
            if not is_yolo_head(model.backend.outputs, model.input.shape):
                detection_outputs(model.backend.outputs)
            model.retask("detection")
        except ModelError:
            if labels is not None:
                model.retask("classification")
    return model


def reloader(
    runtime: RuntimeConfig, top_k: int, min_score: float, iou_threshold: float = DEFAULT_IOU
) -> Reload:
    """How the pipeline's watchdog brings a model back on a fresh delegate or the CPU."""

    def reload(files: ModelFiles, accelerator: str) -> LoadedModel:
        return load_model(
            files, runtime, top_k, min_score, accelerator=accelerator, iou_threshold=iou_threshold
        )

    return reload


def _read_image(path: Path) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        raise ModelError(f"{path}: reading images needs {missing_library('images')}") from None

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ModelError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def infer(
    model: LoadedModel, inputs: list[Path], as_json: bool, runtime: RuntimeConfig, reload: Reload
) -> int:
    """Run ``model`` on images (one result each) or videos (every frame). Prints results.

    Returns 1 when an input gave no result at all, else 0. Raises ModelError or
    SourceError naming an input that cannot be read.
    """
    from agent.config import VideoSource as VideoConfig
    from agent.pipeline import Pipeline
    from agent.sources.opencv import VideoSource

    def show(name: str, result: Result | None, output: Any, ms: float | None = None) -> None:
        if as_json:
            data = result.to_dict() if result is not None else output.to_dict()
            print(dumps({"input": name, **data}), flush=True)
        else:
            timing = f"  ({ms:.1f} ms)" if ms is not None else ""
            print(f"{name}: {output.summary()}{timing}", flush=True)

    failed = False
    for path in inputs:
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                output = model.run(_read_image(path))
            except ValueError as exc:  # the model's input is not an image
                raise ModelError(f"{path}: {exc}") from exc
            show(str(path), None, output)
            continue
        if missing := missing_library("video"):
            raise ModelError(f"{path}: reading videos needs {missing}")
        source = VideoSource(VideoConfig(path=path, fps=0))
        source.open()  # here, so an unreadable file fails now instead of being retried
        source.close()

        closed = threading.Event()  # stdout's reader went away (| head): stop reading

        def emit(result: Result, name: str = str(path), closed: threading.Event = closed) -> None:
            if closed.is_set():
                return
            try:
                show(f"{name}#{result.frame}", result, result.output, result.infer_ms)
            except BrokenPipeError:
                closed.set()

        pipeline = Pipeline(
            source,
            model,
            emit,
            invoke_timeout_s=runtime.invoke_timeout_ms / 1000,
            reload=reload,
            close_model=False,
        )
        pipeline.start()
        try:
            while not pipeline.wait(0.1) and not closed.is_set():
                pass
        finally:
            pipeline.stop()
        if closed.is_set():
            raise BrokenPipeError
        stats = pipeline.stats()
        model = pipeline.model  # the watchdog may have brought up another
        print(
            f"{path}: {stats.results} frames, {stats.errors} errors, "
            f"inference p50 {stats.infer_ms_p50:.1f} ms",
            file=sys.stderr,
        )
        failed = failed or stats.results == 0
    return 1 if failed else 0


def bench(model: LoadedModel, seconds: float, rounds: int, as_json: bool) -> int:
    """Pipeline fps against the bare interpreter loop, on 640x480 frames from memory."""
    from agent.bench import pipeline_vs_bare
    from agent.sources import pattern_frames

    try:
        comparison = pipeline_vs_bare(model, pattern_frames(640, 480), seconds, rounds)
    except ValueError as exc:  # prepare() refused the frames
        raise ModelError(
            f"bench feeds 640x480 camera frames, which this model cannot take: {exc}"
        ) from exc
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
        print(dumps(data, indent=2))
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
