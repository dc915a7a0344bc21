"""The daemon's watchdog rule (agent.daemon.Progress): WATCHDOG=1 only while every
pipeline moves, or has nothing it could do."""

from __future__ import annotations

import pytest

from agent.daemon import STALL_S, Progress
from agent.pipeline import Stats


def _stats(results: int, connected: bool = True) -> Stats:
    return Stats(
        frames=results,
        results=results,
        dropped=0,
        errors=0,
        fps=1.0,
        latency_ms_p50=1.0,
        latency_ms_p95=1.0,
        latency_ms_p99=1.0,
        infer_ms_p50=1.0,
        backend="cpu",
        model="m",
        version=1,
        source_connected=connected,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Each case: the second pipeline's figures at each step (the first always moves), and
# whether the agent is alive after STALL_S + 1 s of them.
@pytest.mark.parametrize(
    ("second", "alive"),
    [
        ([_stats(1), _stats(2), _stats(3)], True),  # both move
        ([_stats(5), _stats(5), _stats(5)], False),  # the second stalls: no WATCHDOG=1
        ([None, None, None], True),  # not serving yet: nothing it could do
        ([_stats(5, False)] * 3, True),  # its source reconnecting
        ([_stats(5), _stats(5), _stats(6)], True),  # it moved again in time
    ],
)
def test_one_stalled_pipeline_among_several_stops_the_watchdog(
    second: list[Stats | None], alive: bool
) -> None:
    clock = Clock()
    progress = Progress(clock)
    verdict = True
    for step, figures in enumerate(second):
        clock.now += (STALL_S + 1) / 2 * (step > 0)
        verdict = progress.alive({"door": _stats(step), "yard": figures})
    assert verdict is alive


def test_a_single_stalled_pipeline_stops_the_watchdog_after_stall_s_only() -> None:
    clock = Clock()
    progress = Progress(clock)
    assert progress.alive({"main": _stats(7)})
    clock.now += STALL_S - 1
    assert progress.alive({"main": _stats(7)})
    clock.now += 2
    assert not progress.alive({"main": _stats(7)})
