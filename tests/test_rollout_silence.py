"""Rollout timeouts judge silence, not duration (issue 14, class 12), without a broker:
which reports are news about a desired state, when silence fails a device, and when the
agent reports download progress."""

from __future__ import annotations

from typing import Any

import pytest

from agent.desired import ProgressPace, download_progress
from agent.fleet.deploy import Verdict, after_silence, news
from agent.manifest import FileEntry

T = 1_800_000_000.125  # the desired state's issued_at
OTHER = T - 60


def _state(phase: str = "probation", outcome: str | None = None, at: float = T) -> dict[str, Any]:
    update = {"id": "u1", "issued_at": at, "phase": phase, "outcome": outcome}
    return {"version": 1, "update": update, "desired": None}


@pytest.mark.parametrize(
    ("stream", "doc", "state", "expected"),
    [
        # its retained state, about this desired state: any phase or outcome
        ("state", _state("downloading"), _state("downloading"), True),
        ("state", _state("probation"), _state("probation"), True),
        ("state", _state("probation", "failed"), _state("probation", "failed"), True),
        # applied (or refused as already bad) without an update of its own
        ("state", {"desired": {"issued_at": T}}, {"desired": {"issued_at": T}}, True),
        # about another desired state
        ("state", _state(at=OTHER), _state(at=OTHER), False),
        ("state", {"version": 1}, {"version": 1}, False),
        # events naming this issued_at (download progress, desired_ignored) or the update
        ("events", {"event": "update_progress", "issued_at": T}, _state("downloading"), True),
        ("events", {"event": "desired_ignored", "issued_at": T}, None, True),
        ("events", {"event": "update_phase", "update_id": "u1"}, _state("validating"), True),
        ("events", {"event": "update_phase", "update_id": "u0"}, _state("validating"), False),
        ("events", {"event": "update_phase", "update_id": "u1"}, _state(at=OTHER), False),
        ("events", {"event": "update_progress", "issued_at": OTHER}, _state(), False),
        ("events", {"event": "model_swapped"}, _state(), False),
        # telemetry: only while this update is on probation (serving it)
        ("telemetry", {"inference": {}}, _state("probation"), True),
        ("telemetry", {"inference": {}}, _state("downloading"), False),  # a stalled download
        ("telemetry", {"inference": {}}, _state("probation", "succeeded"), False),
        ("telemetry", {"inference": {}}, _state("probation", at=OTHER), False),
        ("telemetry", {"inference": {}}, None, False),
        # nothing else, and nothing that is not a document
        ("status", {"state": "online"}, _state(), False),
        ("results", {"classes": []}, _state(), False),
        ("state", None, _state(), False),
        ("telemetry", {"inference": {}}, {"update": "probation"}, False),  # wrong type
        ("events", {"issued_at": str(T)}, None, False),
    ],
)
def test_news_is_what_a_device_says_about_this_desired_state(
    stream: str, doc: dict[str, Any] | None, state: dict[str, Any] | None, expected: bool
) -> None:
    assert news(stream, doc, state, T) is expected


PENDING = Verdict("pending", "probation")


@pytest.mark.parametrize(
    ("verdict", "heard_at", "now", "timeout", "failed"),
    [
        (PENDING, 100.0, 103.9, 4.0, False),
        (PENDING, 100.0, 104.0, 4.0, True),
        # 200 s since it was sent, but news 1 s ago: a long probation is not silence
        (PENDING, 299.0, 300.0, 90.0, False),
        (PENDING, 100.0, 300.0, 90.0, True),
        (Verdict("succeeded", "runs v2"), 0.0, 1e6, 1.0, False),
        (Verdict("failed", "rolled back"), 0.0, 1e6, 1.0, False),
    ],
)
def test_a_pending_device_fails_after_timeout_seconds_of_silence_not_of_duration(
    verdict: Verdict, heard_at: float, now: float, timeout: float, failed: bool
) -> None:
    result = after_silence(verdict, heard_at, now, timeout)
    if not failed:
        assert result is verdict
        return
    assert result.status == "failed"
    assert result.detail == f"said nothing about it for {timeout:g} s (last: probation)"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_paced_and_only_reported_while_the_work_moves() -> None:
    clock = Clock()
    pace = ProgressPace(2.0, clock)
    steps = [  # (time, moved, due)
        (0.5, True, False),  # too soon after the start
        (2.0, False, True),  # moved since the last report, and 2 s passed
        (3.0, True, False),
        (4.5, False, True),
        (7.0, False, False),  # stalled: nothing to report, however long
        (30.0, False, False),
        (30.5, True, True),
    ]
    for at, moved, due in steps:
        clock.now = at
        assert pace.due(moved) is due, at


def test_download_progress_events_name_the_update_and_stop_when_the_transfer_stalls() -> None:
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    make = download_progress(
        update_id="u1",
        model="colours",
        version=2,
        issued_at=T,
        every_s=1.0,
        event=lambda name, detail: events.append((name, dict(detail))),
        clock=clock,
    )
    progress = make(
        FileEntry(name="model.tflite", role="model", variant="cpu", size=1000, sha256="0" * 64)
    )
    for at, done in [(0.0, 0), (0.5, 100), (1.2, 300), (1.4, 400), (2.5, 400), (9.0, 400)]:
        clock.now = at
        progress(done, 1000)
    assert events == [
        (
            "update_progress",
            {
                "update_id": "u1",
                "model": "colours",
                "version": 2,
                "issued_at": T,
                "phase": "downloading",
                "file": "model.tflite",
                "done": 300,
                "size": 1000,
            },
        ),
        # 400 arrived at 1.4 s: reported at the next call after 2.2 s, then silence
        (
            "update_progress",
            {
                "update_id": "u1",
                "model": "colours",
                "version": 2,
                "issued_at": T,
                "phase": "downloading",
                "file": "model.tflite",
                "done": 400,
                "size": 1000,
            },
        ),
    ]
