"""``ShadowRun``: a pipeline observer that runs a candidate model on a share of frames.

On the pipeline's inference thread, after the active model's result went out: a frame
in the ``sample_pct`` sample (agreement.sampled) runs ``candidate.run(item.frame)``
unless the shadow invokes' share of recent wall time is at its bound (counted as
``skipped``); its output is compared with the active result's and never published.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.shadow.agreement import Agreement, CpuBudget, metric_of, sampled, should_promote

if TYPE_CHECKING:
    from agent.contract import AgreementDoc
    from agent.frames import Item, Result
    from agent.runtime.model import LoadedModel
    from agent.shadow.instruction import ShadowInstruction

log = logging.getLogger(__name__)

LATENCY_WINDOW = 200  # recent invokes the p50s are taken over
CLOSE_WAIT_S = 10.0  # how long close() waits for an invoke under way


def _p50(values: deque[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


class ShadowRun:
    """The candidate of one shadow run, and its figures (read from any thread)."""

    def __init__(
        self,
        candidate: LoadedModel,
        instruction: ShadowInstruction,
        *,
        on_promotable: Callable[[ShadowRun], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.candidate = candidate
        self.instruction = instruction
        self.on_promotable = on_promotable
        self.clock = clock
        self.budget = CpuBudget(instruction.max_cpu_pct)
        self.agreement = Agreement(metric_of(candidate.files.task))
        self._lock = threading.Lock()
        self._seen = 0  # frames of this model the run was shown
        self.skipped = 0
        self.errors = 0
        self.error: str | None = None
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._active: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._closed = False
        self._invoke = threading.Lock()  # held during an invoke: close() waits for it
        self._promotable = False

    def observe(self, item: Item, result: Result) -> None:
        if (
            self._closed
            or result.model != self.instruction.model
            or result.version == self.instruction.version  # the candidate serves already
        ):
            return
        index, self._seen = self._seen, self._seen + 1
        if not sampled(index, self.instruction.sample_pct):
            return
        now = self.clock()
        if not self.budget.allows(now):
            with self._lock:
                self.skipped += 1
            return
        try:
            with self._invoke:
                if self._closed:
                    return
                output = self.candidate.run(item.frame)
        except Exception as exc:  # a candidate's failure is its own: counted, reported
            ended = self.clock()
            self.budget.spent(ended, ended - now)
            with self._lock:
                self.errors += 1
                self.error = f"{type(exc).__name__}: {exc}"[:300]
            return
        ended = self.clock()
        self.budget.spent(ended, ended - now)
        with self._lock:
            self._latency.append((ended - now) * 1000.0)
            self._active.append(result.infer_ms)
            self.agreement.add(result.output, output)
        self._check_promotion()

    def _check_promotion(self) -> None:
        promote = self.instruction.promote
        if promote is None or self._promotable or self.on_promotable is None:
            return
        with self._lock:
            ready = should_promote(
                frames=self.agreement.frames,
                errors=self.errors,
                agreement=self.agreement.value,
                metric=self.agreement.metric,
                min_frames=promote.min_frames,
                min_agreement=promote.min_agreement,
            )
        if ready:
            self._promotable = True
            self.on_promotable(self)

    def figures(self) -> tuple[int, int, int, str | None, float | None, float | None, AgreementDoc]:
        """frames, skipped, errors, error, latency p50, active latency p50, agreement."""
        with self._lock:
            return (
                self.agreement.frames,
                self.skipped,
                self.errors,
                self.error,
                _p50(self._latency),
                _p50(self._active),
                self.agreement.doc(),
            )

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop comparing and close the candidate (after it was detached), once an
        invoke under way ended; one that does not end within ``timeout`` is left to
        the garbage collector rather than closed under it."""
        self._closed = True
        if not self._invoke.acquire(timeout=timeout):
            log.warning("shadow candidate v%d still invoking: not closed", self.instruction.version)
            return
        try:
            self.candidate.close()
        finally:
            self._invoke.release()
