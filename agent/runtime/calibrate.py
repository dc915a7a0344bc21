"""``runtime.interpreters: auto`` and ``runtime.threads: auto``: a short calibration.

At model load, the candidate configurations (one interpreter of 1..cores threads; N
interpreters of one thread each, N = 2..cores) are each timed for a few invokes on one
input, within a bounded total time; the best throughput wins. ``candidates`` and
``choose`` are the rules (pure, table-tested); ``calibrate`` does the timing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from agent.contract import RuntimeDoc
    from agent.runtime.backends import Backend, TensorSpec

BUDGET_S = 1.2  # timing and loading; the warm-up runs of the winner come after
MIN_RUNS = 2  # invokes per interpreter a candidate needs to count
MARGIN = 0.05  # a costlier candidate must be this much faster to be chosen

Setting = int | Literal["auto"]


@dataclass(frozen=True, order=True)
class Candidate:
    """``interpreters`` side by side, each of ``threads`` threads."""

    interpreters: int
    threads: int

    @property
    def cost(self) -> tuple[int, int]:
        # Fewer cores first (a core left free). On as many cores, interpreters before
        # threads: the pipeline's per-frame work (handing a frame over, reading and
        # interpreting outputs) overlaps another interpreter's invoke, never its own
        # threads' (measured: pose_landmark_full, 2x1 and 1x2 equal bare, the pipeline
        # 1.12 and 0.93 of the best bare loop).
        return (self.interpreters * self.threads, -self.interpreters)


@dataclass(frozen=True)
class Measurement:
    candidate: Candidate
    per_s: float  # invokes per second, all interpreters together


@dataclass(frozen=True)
class Choice:
    """What serves: recorded in the state (``runtime``) and logged once."""

    interpreters: int
    threads: int
    chosen_by: Literal["config", "calibration"]
    note: str = ""  # e.g. interpreters ignored on the Edge TPU

    def to_dict(self) -> RuntimeDoc:
        return {
            "interpreters": self.interpreters,
            "threads": self.threads,
            "chosen_by": self.chosen_by,
            "note": self.note or None,
        }


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def candidates(interpreters: Setting, threads: Setting, ncores: int) -> list[Candidate]:
    """The configurations to try, most likely first; one means nothing to calibrate.

    More than one interpreter always means one thread each.
    """
    ncores = max(1, min(ncores, 16))
    if interpreters != "auto":
        if interpreters > 1:
            return [Candidate(interpreters, 1)]
        if threads != "auto":
            return [Candidate(1, threads)]
        return [Candidate(1, t) for t in _likely(ncores)]
    if threads == "auto":
        singles = [Candidate(1, t) for t in _likely(ncores)]
    else:
        singles = [Candidate(1, threads)]
    pools = [Candidate(n, 1) for n in _likely(ncores) if n > 1]
    # one thread, then the whole machine either way, then the rest
    ordered = singles[:1] + pools[:1] + singles[1:2] + pools[1:] + singles[2:]
    return list(dict.fromkeys(ordered))


def _likely(ncores: int) -> list[int]:
    """1, ncores, then the counts between: the ends are where the answer usually is."""
    return list(dict.fromkeys([1, ncores, *range(2, ncores)]))


def choose(measurements: Sequence[Measurement], margin: float = MARGIN) -> Candidate:
    """The cheapest candidate within ``margin`` of the best throughput.

    Raises ValueError on no measurements.
    """
    if not measurements:
        raise ValueError("nothing measured")
    best = max(m.per_s for m in measurements)
    fit = [m.candidate for m in measurements if m.per_s * (1 + margin) >= best]
    return min(fit, key=lambda c: c.cost)


_chosen: dict[tuple[object, ...], Candidate] = {}  # key: see remembered()
_chosen_lock = threading.Lock()


def remembered(key: tuple[object, ...]) -> Candidate | None:
    """An earlier calibration's choice for ``key`` (model name, backend, the candidates).

    A hot swap to the next version of a model reuses it: calibrating beside the running
    pipeline would measure the contention, and take the cores the stream needs.
    """
    with _chosen_lock:
        return _chosen.get(key)


def remember(key: tuple[object, ...], candidate: Candidate) -> None:
    with _chosen_lock:
        _chosen[key] = candidate


def forget() -> None:
    """Calibrate again at the next load (tests; a changed machine)."""
    with _chosen_lock:
        _chosen.clear()


Make = Callable[[int], "Backend"]
"""A loaded, allocated backend of this many threads."""


def sample(spec: TensorSpec) -> np.ndarray:
    """An input like a camera's: values spread over the tensor's range, not zeros."""
    import numpy as np

    rng = np.random.default_rng(0)
    if np.issubdtype(spec.dtype, np.integer):
        info = np.iinfo(spec.dtype)
        return rng.integers(info.min, info.max, spec.shape, dtype=spec.dtype, endpoint=True)
    return rng.random(spec.shape).astype(spec.dtype)


def calibrate(
    plan: Sequence[Candidate],
    make: Make,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Candidate, list[Backend], list[Measurement]]:
    """Time each candidate of ``plan`` on one input; the winner with its backends.

    Bounded by ``budget_s`` (a candidate left without time is not tried; the first
    always is). The losers' backends are closed. Raises what ``make`` or an invoke
    raises (ModelError, RuntimeError), with every backend closed.
    """
    deadline = clock() + budget_s
    ones: list[Backend] = []  # one-thread backends, shared by (1, 1) and (N, 1)
    wide: dict[int, Backend] = {}
    measured: list[Measurement] = []
    try:
        for index, candidate in enumerate(plan):
            left = deadline - clock()
            if index and left <= 0:
                break
            backends = _backends(candidate, make, ones, wide)
            tensor = sample(backends[0].inputs[0])
            share = max(deadline - clock(), 0.0) / (len(plan) - index)  # loading counts
            measured.append(Measurement(candidate, _rate(backends, tensor, share, clock)))
        winner = choose(measured)
        kept = _backends(winner, make, ones, wide)
    except BaseException:
        _close([*ones, *wide.values()], [])
        raise
    _close([*ones, *wide.values()], kept)
    return winner, kept, measured


def _backends(
    candidate: Candidate, make: Make, ones: list[Backend], wide: dict[int, Backend]
) -> list[Backend]:
    if candidate.interpreters == 1 and candidate.threads > 1:
        if candidate.threads not in wide:
            wide[candidate.threads] = _warm(make(candidate.threads))
        return [wide[candidate.threads]]
    while len(ones) < candidate.interpreters:
        ones.append(_warm(make(1)))
    return ones[: candidate.interpreters]


def _warm(backend: Backend) -> Backend:
    import numpy as np

    spec = backend.inputs[0]
    try:
        backend.infer([np.zeros(spec.shape, spec.dtype)])  # the first invoke plans kernels
    except BaseException:
        backend.close()
        raise
    return backend


def _rate(
    backends: Sequence[Backend], tensor: np.ndarray, seconds: float, clock: Callable[[], float]
) -> float:
    """Invokes per second of ``backends`` run side by side, one thread each."""
    counts = [0] * len(backends)
    errors: list[BaseException] = []
    started = clock()
    until = started + seconds

    def run(slot: int) -> None:
        backend = backends[slot]
        try:
            while counts[slot] < MIN_RUNS or clock() < until:
                backend.infer([tensor])
                counts[slot] += 1
        except BaseException as exc:  # raised again in the calling thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(backends))
    ]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()  # CPU invokes end: bounded by MIN_RUNS invokes or the share
    if errors:
        raise errors[0]
    return sum(counts) / max(clock() - started, 1e-9)


def _close(backends: Sequence[Backend], kept: Sequence[Backend]) -> None:
    for backend in backends:
        if not any(backend is k for k in kept):
            backend.close()
