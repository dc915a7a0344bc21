"""Probation: judging a new release by the stream's figures over a window of time.

Pure: the worker feeds it the pipeline's counters and the monotonic clock; it says
whether the release passes, fails or is still being watched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Judgement:
    """``watching`` (keep going), ``passed`` or ``failed``, with the reason to report."""

    verdict: Literal["watching", "passed", "failed"]
    reason: str = ""


class Probation:
    """A window from now until ``end`` (monotonic) in which the release must behave.

    It fails when more than ``max_error_rate`` of the frames since the start failed,
    once at least ``min_errors`` have; or when the model stops serving. It passes when
    the window ends without that.
    """

    def __init__(
        self,
        end: float,
        *,
        min_errors: int,
        max_error_rate: float,
        baseline: tuple[int, int] | None = None,
    ) -> None:
        self.end = end
        self.min_errors = min_errors
        self.max_error_rate = max_error_rate
        self.baseline = baseline  # (errors, results) when the watch began

    def judge(self, counters: tuple[int, int] | None, now: float) -> Judgement:
        """Judge the stream's (errors, results) counters at ``now``; None: not serving."""
        if counters is None:
            return Judgement("failed", "probation: the model is not serving")
        if self.baseline is None:
            self.baseline = counters
        errors = counters[0] - self.baseline[0]
        results = counters[1] - self.baseline[1]
        rate = errors / max(errors + results, 1)
        if errors >= self.min_errors and rate > self.max_error_rate:
            return Judgement(
                "failed",
                f"probation: {errors} of {errors + results} frames failed "
                f"({rate:.0%} > update.probation_max_error_rate {self.max_error_rate:.0%})",
            )
        if now >= self.end:
            return Judgement("passed", f"probation passed ({results} results, {errors} errors)")
        return Judgement("watching", f"{results} results, {errors} errors so far")
