"""Frames lost, and the longest gap between results, while models are hot-swapped.

A source paced at --fps (a camera's rate; frames the model cannot take in time are
dropped and counted) runs through the pipeline while a new release of the model is
loaded and warmed up beside the running one and swapped in, --swaps times. Goals: 0
frames lost, and no gap between two results longer than 2 frame intervals.

Two loaders, alternated swap by swap in the same run: ``paced``, the daemon's way
(``Service.load``: ``load_model(..., pace=pipeline.between_frames)``, allocating
and each warm-up run in a gap between frames), and ``unpaced``, the loader before it
(everything at once, beside the stream). ``--busy N`` runs N busy-looping processes
beside, as another program on the device would (the same for both loaders).

    python bench/hot_swap.py [--fps 30] [--swaps 6] [--threads 2] [--interpreters 1]
                             [--busy 0] [--trace]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import zoo  # noqa: E402
from agent.config import RuntimeConfig  # noqa: E402
from agent.pipeline import Pipeline, Result  # noqa: E402
from agent.runtime import ModelFiles, load_model  # noqa: E402
from agent.runtime import backends as runtime_backends  # noqa: E402
from agent.sources import MemorySource, pattern_frames  # noqa: E402

MODELS = ("face_detection_short_range.tflite", "pose_landmark_full.tflite")
LOADERS = ("unpaced", "paced")
SETTLE_S = 0.7  # after each swap, before the next


@dataclass
class Swap:
    loader: str
    started: float
    returned: float = 0.0
    load_ms: float = 0.0


@dataclass
class Trace:
    """Per-thread marks (capture, invoke start/end, allocate, results), for --trace."""

    on: bool
    marks: list[tuple[float, str, str]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        if self.on:
            self.marks.append((time.monotonic(), threading.current_thread().name, what))


def traced(trace: Trace) -> None:
    """Wrap the runtime's Interpreter so that allocation and invokes leave marks."""
    name, interpreter_class, load_delegate = runtime_backends.runtime_api()

    class Interpreter(interpreter_class):  # type: ignore[misc,valid-type]
        def allocate_tensors(self) -> None:
            trace.mark("allocate_tensors start")
            super().allocate_tensors()
            trace.mark("allocate_tensors end")

        def invoke(self) -> None:
            trace.mark("invoke start")
            super().invoke()
            trace.mark("invoke end")

    runtime_backends.runtime_api = lambda: (name, Interpreter, load_delegate)  # type: ignore[assignment]


def measure(name: str, fps: float, swaps: int, runtime: RuntimeConfig, trace: Trace) -> None:
    path = zoo.fetch(name)

    def release(version: int) -> ModelFiles:
        return ModelFiles(name=path.stem, version=version, task="raw", cpu=path)

    done: list[tuple[float, int, int | None]] = []

    def collect(result: Result) -> None:
        done.append((time.monotonic(), result.frame, result.version))
        trace.mark(f"result frame {result.frame} v{result.version}")

    source = MemorySource(pattern_frames(640, 480), loop=True)  # paced to fps: like a camera
    read = source.read

    def read_marked(timeout: float) -> object:
        frame = read(timeout)
        trace.mark("capture")
        return frame

    source.read = read_marked  # type: ignore[method-assign,assignment]
    pipeline = Pipeline(source, load_model(release(1), runtime), collect, fps=fps)
    pipeline.start()
    done_swaps: list[Swap] = []
    try:
        time.sleep(1.0)
        for version in range(2, swaps + 2):
            swap = Swap(LOADERS[version % 2], time.monotonic())
            trace.mark(f"load v{version} ({swap.loader}) start")
            pace = pipeline.between_frames if swap.loader == "paced" else None
            new = load_model(release(version), runtime, pace=pace)  # beside the running model
            swap.load_ms = (time.monotonic() - swap.started) * 1000
            trace.mark(f"load v{version} end: swap")
            assert pipeline.swap(new)
            swap.returned = time.monotonic()
            trace.mark("swap returned")
            done_swaps.append(swap)
            time.sleep(SETTLE_S)
    finally:
        pipeline.stop()
    stats = pipeline.stats()
    interval = 1.0 / fps
    print(
        f"{name[:-7]} ({len(done)} results, {stats.dropped} dropped, {stats.errors} errors; "
        f"runtime.interpreters {runtime.interpreters} x threads {runtime.threads}, "
        f"warmup_runs {runtime.warmup_runs}):"
    )
    for loader in LOADERS:
        lost, gaps, loads = 0, [], []
        for swap in done_swaps:
            if swap.loader != loader:
                continue
            # results from the last before the load started to the first well after the swap
            window = [d for d in done if swap.started - 2 * interval <= d[0] <= swap.returned + 0.3]
            frames = [frame for _, frame, _ in window]
            lost += len(set(range(frames[0], frames[-1] + 1)) - set(frames))
            gaps.append(max(b[0] - a[0] for a, b in itertools.pairwise(window)))
            loads.append(swap.load_ms)
        print(
            f"  {loader:8} {len(loads)} swaps: frames lost {lost}; longest gap "
            f"{max(gaps) * 1000:.1f} ms = {max(gaps) / interval:.2f} frame intervals "
            f"(goal: 0 and <= 2); load + warm-up beside {min(loads):.0f}-{max(loads):.0f} ms"
        )
    if trace.on:
        for swap in done_swaps[:4]:
            print(f"  -- timeline of a {swap.loader} swap (ms from the load's start)")
            for at, thread, what in trace.marks:
                if swap.started - 0.04 <= at <= swap.returned + 0.05:
                    print(f"  {(at - swap.started) * 1000:8.1f}  {thread[:16]:16}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=30)
    parser.add_argument("--swaps", type=int, default=6, help="alternating the two loaders")
    parser.add_argument(
        "--threads", type=int, default=RuntimeConfig().threads, help="runtime.threads"
    )
    parser.add_argument(
        "--interpreters", type=int, default=1, help="runtime.interpreters (each of one thread)"
    )
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside")
    parser.add_argument("--trace", action="store_true", help="print swap timelines")
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    trace = Trace(args.trace)
    if args.trace:
        traced(trace)
    print(f"switch interval {sys.getswitchinterval() * 1000:g} ms, {args.busy} busy beside")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for name in args.models:
            threads = 1 if args.interpreters > 1 else args.threads
            runtime = RuntimeConfig(threads=threads, interpreters=args.interpreters)
            measure(name, args.fps, args.swaps, runtime, trace)
    finally:
        for process in busy:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
