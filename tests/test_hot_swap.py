"""A model loaded beside a running stream makes room for it, with a real model (BlazeFace
from a pinned wheel) on the real interpreter.

What is proved is the mechanism, not a timing: the loader's GIL-holding and CPU-heavy
steps (allocating the tensors, each warm-up run) wait for a gap between frames — never
while the serving model is busy, one step per gap — and the replaced model is closed by
the thread that called ``swap``, not by the inference thread. ``bench/hot_swap.py``
measures what that buys (frames lost, the longest gap between results).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import RuntimeConfig
from agent.pipeline import Pipeline, Result
from agent.runtime import LoadedModel, ModelFiles, load_model
from agent.runtime.backends import CpuBackend
from agent.sources import MemorySource, pattern_frames

MODEL = "face_detection_short_range.tflite"
RUNTIME = RuntimeConfig(threads=1, warmup_runs=2)
FRAMES = pattern_frames(160, 120)


class Watched(CpuBackend):
    """The real CPU backend, noting its loads, invokes and closes (with their threads);
    ``hold`` (when given) keeps every invoke waiting until it is set."""

    def __init__(self, threads: int, hold: threading.Event | None = None) -> None:
        super().__init__(threads)
        self.hold = hold
        self.loaded = False
        self.invokes = 0
        self.busy = threading.Event()
        self.closed_by: list[str] = []

    def load(self, model: Path) -> None:
        super().load(model)
        self.loaded = True

    def infer(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        self.busy.set()
        try:
            if self.hold is not None:
                assert self.hold.wait(10), "held for too long"
            self.invokes += 1
            return super().infer(tensors)
        finally:
            self.busy.clear()

    def close(self) -> None:
        if self._interpreter is not None:
            self.closed_by.append(threading.current_thread().name)
        super().close()


def load(
    path: Path, version: int, backend: Watched, pace: Callable[[], object] | None = None
) -> LoadedModel:
    files = ModelFiles(name=path.stem, version=version, task="raw", cpu=path)
    return load_model(files, RUNTIME, backends={"cpu": lambda runtime: backend}, pace=pace)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_model_loaded_beside_a_busy_stream_waits_for_gaps_between_frames(
    zoo_file: Any,
) -> None:
    path = zoo_file(MODEL)
    hold = threading.Event()
    hold.set()  # let the serving model's own warm-up and first frames through
    serving = Watched(1, hold)
    results: list[Result] = []
    pipeline = Pipeline(
        MemorySource(FRAMES, loop=True), load(path, 1, serving), results.append, fps=30
    )
    candidate = Watched(1)
    steps: list[tuple[bool, int, bool]] = []  # (a gap was given, results then, serving busy)
    asked = threading.Event()

    def pace() -> bool:
        asked.set()
        gap = pipeline.between_frames(5.0)
        steps.append((gap, len(results), serving.busy.is_set()))
        return gap

    loaded: list[LoadedModel] = []
    pipeline.start()
    try:
        wait_for(lambda: len(results) >= 3)
        hold.clear()
        wait_for(serving.busy.is_set)  # a frame is in the serving model, held there
        loader = threading.Thread(target=lambda: loaded.append(load(path, 2, candidate, pace)))
        loader.start()
        assert asked.wait(5)
        time.sleep(0.3)  # while the stream is busy the loader does nothing
        assert not candidate.loaded and candidate.invokes == 0 and not steps
        hold.set()
        loader.join(10)
        assert loaded and candidate.loaded
        assert pipeline.swap(loaded[0])
    finally:
        hold.set()
        pipeline.stop()
    # allocating, then each warm-up run: each in a gap between frames given by the
    # pipeline (not after a timeout), one step per gap, the serving model idle
    assert len(steps) == 1 + RUNTIME.warmup_runs
    assert all(gap and not busy for gap, _, busy in steps)
    counts = [count for _, count, _ in steps]
    assert counts == sorted(set(counts))
    assert candidate.invokes >= RUNTIME.warmup_runs
    assert results[-1].version == 2


def test_the_replaced_model_is_closed_by_the_swapper_not_the_inference_thread(
    zoo_file: Any,
) -> None:
    path = zoo_file(MODEL)
    old, new = Watched(1), Watched(1)
    results: list[Result] = []
    events: list[str] = []
    pipeline = Pipeline(
        MemorySource(FRAMES, loop=True),
        load(path, 1, old),
        results.append,
        lambda name, detail: events.append(name),
        fps=30,
    )
    pipeline.start()
    try:
        wait_for(lambda: len(results) >= 3)
        assert pipeline.swap(load(path, 2, new, pipeline.between_frames))
        assert old.closed_by == [threading.current_thread().name]  # closed once swap returned
        wait_for(lambda: results[-1].version == 2)
    finally:
        pipeline.stop()
    assert "pipeline-infer" not in old.closed_by
    assert events == ["model_swapped"]
    assert new.closed_by == [threading.current_thread().name]  # by stop()


def test_with_several_interpreters_the_old_set_drains_then_the_swapper_closes_it(
    zoo_file: Any,
) -> None:
    path = zoo_file(MODEL)
    made: dict[int, list[Watched]] = {1: [], 2: []}
    runtime = RuntimeConfig(threads=1, interpreters=2, warmup_runs=1)

    def release(version: int) -> LoadedModel:
        def make(runtime: RuntimeConfig) -> Watched:
            made[version].append(Watched(1))
            return made[version][-1]

        files = ModelFiles(name=path.stem, version=version, task="raw", cpu=path)
        return load_model(files, runtime, backends={"cpu": make})

    results: list[Result] = []
    # a file played as fast as possible: frames are always in flight on both interpreters
    pipeline = Pipeline(MemorySource(FRAMES, loop=True), release(1), results.append, fps=0)
    pipeline.start()
    try:
        wait_for(lambda: len(results) >= 20)
        assert pipeline.swap(release(2))
        swapper = threading.current_thread().name
        # swap() returned once the frames in flight on the old set were done, and closed it
        assert [old.closed_by for old in made[1]] == [[swapper], [swapper]]
        wait_for(lambda: results[-1].version == 2)
    finally:
        pipeline.stop()
    assert len(made[1]) == len(made[2]) == 2
    versions = [result.version for result in results]
    assert versions == sorted(versions)  # in frame order, versions never go back
    frames = [result.frame for result in results]
    assert frames == list(range(frames[0], frames[0] + len(frames)))  # none lost
    assert all(old.invokes > 0 for old in made[1])  # both interpreters served


def test_beside_a_slow_stream_the_loader_does_not_wait_a_frame_per_step(zoo_file: Any) -> None:
    path = zoo_file(MODEL)
    results: list[Result] = []
    # 5 fps: frames 200 ms apart, the model idle nearly all of the time
    pipeline = Pipeline(
        MemorySource(FRAMES, loop=True), load(path, 1, Watched(1)), results.append, fps=5
    )
    pipeline.start()
    try:
        wait_for(lambda: len(results) >= 4)
        before = len(results)
        gaps = [pipeline.between_frames(5.0) for _ in range(20)]  # a latency budget's steps
        during = len(results) - before
    finally:
        pipeline.stop()
    assert all(gaps)
    # one gap per step would have taken 20 frames (4 s); at most the frame in hand passed
    assert during <= 1
