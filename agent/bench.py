"""Throughput measurements, each a ratio against a baseline taken in the same run.

These machines are noisy, so absolute rates drift; a ratio of two loops run
alternately on the same model, threads and frames does not. Used by
``edge-agent bench`` and the scripts in ``bench/``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.pipeline import Pipeline, Result, Stats
from agent.sources.base import EndOfStream, Source
from agent.sources.synthetic import MemorySource

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.model import LoadedModel


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline: str
    fps: float  # median over rounds
    baseline_fps: float
    stats: Stats | None

    @property
    def ratio(self) -> float:
        return self.fps / self.baseline_fps if self.baseline_fps else 0.0


def bare_loop_fps(model: LoadedModel, frame: np.ndarray, seconds: float) -> float:
    """The interpreter alone: set_tensor, invoke, get_tensor on one prepared input."""
    tensor, _ = model.prepare(frame)
    infer = model.backend.infer
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        infer([tensor])
        count += 1
        if count % 8 == 0 and time.perf_counter() >= deadline:
            break
    return count / (time.perf_counter() - started)


def pipeline_fps(model: LoadedModel, source: Source, seconds: float) -> tuple[float, Stats]:
    """Results per second of the pipeline on ``source`` (run for about ``seconds``)."""
    done = [0]
    first: list[float] = []

    def count(result: Result) -> None:
        if not first:
            first.append(time.perf_counter())
        done[0] += 1

    pipeline = Pipeline(source, model, count, close_model=False)
    pipeline.start()
    try:
        time.sleep(seconds)
        ended, results = time.perf_counter(), done[0]
        stats = pipeline.stats()
    finally:
        pipeline.stop()
    return (results - 1) / (ended - first[0]) if results > 1 else 0.0, stats


def sequential_fps(model: LoadedModel, source: Source, seconds: float) -> float:
    """The naive loop: read a frame, prepare, infer, interpret, one after another."""
    source.open()
    count, started = 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            try:
                frame = source.read(1.0)
            except EndOfStream:
                source.close()
                source.open()
                continue
            if frame is None:
                continue
            tensor, geometry = model.prepare(frame)
            model.interpret(model.infer(tensor), geometry)
            count += 1
    finally:
        source.close()
    return count / (time.perf_counter() - started)


def compare(
    name: str,
    baseline: str,
    measure: Callable[[], tuple[float, Stats | None]],
    measure_baseline: Callable[[], float],
    rounds: int,
) -> Comparison:
    """Run ``measure`` and ``measure_baseline`` alternately ``rounds`` times; medians."""
    ours, theirs, stats = [], [], None
    for _ in range(rounds):
        theirs.append(measure_baseline())
        fps, stats = measure()
        ours.append(fps)
    return Comparison(name, baseline, statistics.median(ours), statistics.median(theirs), stats)


def pipeline_vs_bare(
    model: LoadedModel, frames: Sequence[np.ndarray], seconds: float = 2.0, rounds: int = 3
) -> Comparison:
    """Pipeline fps on an in-memory source / the bare interpreter loop, same model."""
    return compare(
        "pipeline",
        "bare interpreter loop",
        lambda: pipeline_fps(model, MemorySource(frames, loop=True), seconds),
        lambda: bare_loop_fps(model, frames[0], seconds),
        rounds,
    )
