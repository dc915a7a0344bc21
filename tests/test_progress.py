"""The download progress line: formatting and the smoothed rate, as tables."""

from __future__ import annotations

import io

import pytest

from agent.manifest import FileEntry
from agent.progress import (
    ProgressLine,
    RateMeter,
    eta_text,
    interrupted_text,
    progress_text,
    rate_text,
)


def _entry(size: int, name: str = "model.tflite") -> FileEntry:
    return FileEntry(name=name, sha256="0" * 64, size=size, role="model", variant="cpu")


@pytest.mark.parametrize(
    ("done", "total", "rate", "expected"),
    [
        (12_300_000, 40_000_000, 4_100_000, "model.tflite  12.3 / 40.0 MB  4.1 MB/s  ETA 7 s"),
        (0, 40_000_000, None, "model.tflite  0.0 / 40.0 MB  -- B/s  ETA --"),
        (1_000_000, 40_000_000, 0.0, "model.tflite  1.0 / 40.0 MB  -- B/s  ETA --"),
        (40_000_000, 40_000_000, 5e6, "model.tflite  40.0 / 40.0 MB  5.0 MB/s  ETA 0 s"),
        (500_000, 1_500_000_000, 250_000, "model.tflite  0.0 / 1.5 GB  250.0 kB/s  ETA 1 h 39 min"),
        (0, 2_400_000, 20_000, "model.tflite  0.0 / 2.4 MB  20.0 kB/s  ETA 2 min 00 s"),
        (2_500_000, None, 1_000_000, "model.tflite  2.5 MB  1.0 MB/s"),  # total unknown
        (900, 0, 12, "model.tflite  900 B  12 B/s"),
    ],
)
def test_progress_text(done: int, total: int | None, rate: float | None, expected: str) -> None:
    assert progress_text("model.tflite", done, total, rate) == expected


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(None, "-- B/s"), (0, "-- B/s"), (-1, "-- B/s"), (999, "999 B/s"), (1e9, "1.0 GB/s")],
)
def test_rate_text(rate: float | None, expected: str) -> None:
    assert rate_text(rate) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "--"),
        (float("inf"), "--"),
        (-1, "--"),
        (0.2, "1 s"),
        (59, "59 s"),
        (60, "1 min 00 s"),
        (3599, "59 min 59 s"),
        (7260, "2 h 01 min"),
    ],
)
def test_eta_text(seconds: float | None, expected: str) -> None:
    assert eta_text(seconds) == expected


def test_rate_is_smoothed_not_instantaneous() -> None:
    meter = RateMeter(half_life_s=1.0)
    assert meter.add(0.0, 5_000_000) is None  # the baseline: bytes kept from before
    assert meter.add(1.0, 6_000_000) == 1_000_000  # the first measured second, as it was
    # One second at 3 MB/s moves the estimate half way, not all the way.
    assert meter.add(2.0, 9_000_000) == pytest.approx(2_000_000)
    # A stall pulls it down gradually: the ETA does not jump to "never" at once.
    assert meter.add(3.0, 9_000_000) == pytest.approx(1_000_000)
    assert meter.add(3.0, 9_000_000) == pytest.approx(1_000_000)  # no time passed: no change


def test_rate_restarts_from_a_new_baseline_when_the_bytes_go_back() -> None:
    meter = RateMeter(half_life_s=1.0)
    meter.add(0.0, 0)
    meter.add(1.0, 2_000_000)
    # The server ignored Range: the file starts again from 0; no negative rate.
    assert meter.add(2.0, 100_000) == 2_000_000
    assert meter.add(3.0, 2_100_000) == pytest.approx(2_000_000)


@pytest.mark.parametrize(
    ("entry", "kept", "expected"),
    [
        (None, 0, "interrupted before any file was downloaded"),
        (_entry(3_000_000), 0, "interrupted: no partial download kept"),
        (
            _entry(3_000_000),
            1_200_000,
            "interrupted: partial download of model.tflite kept for resume (1.2 of 3.0 MB)",
        ),
    ],
)
def test_interrupted_text(entry: FileEntry | None, kept: int, expected: str) -> None:
    assert interrupted_text(entry, kept) == expected


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_redraws_at_most_five_times_a_second_and_ends_the_line() -> None:
    stream, clock = io.StringIO(), _Clock()
    line = ProgressLine(stream, enabled=True, clock=clock)
    show = line(_entry(3_000_000))
    assert show is not None and line.current is not None
    show(0, 3_000_000)
    for done in range(100_000, 1_000_000, 100_000):  # nine chunks within 0.1 s: not drawn
        clock.now += 0.01
        show(done, 3_000_000)
    clock.now += 0.5
    show(1_500_000, 3_000_000)
    clock.now += 0.5
    show(3_000_000, 3_000_000)
    frames = stream.getvalue().split("\r")[1:]
    assert [f.split("\x1b[K")[0] for f in frames] == [
        "model.tflite  0.0 / 3.0 MB  -- B/s  ETA --",
        "model.tflite  1.5 / 3.0 MB  2.5 MB/s  ETA 1 s",
        "model.tflite  3.0 / 3.0 MB  2.6 MB/s  ETA 0 s",  # 3 MB/s, smoothed
    ]
    assert stream.getvalue().endswith("\n")
    line.end()  # already ended: nothing more
    assert stream.getvalue().count("\n") == 1


def test_progress_line_is_silent_when_disabled_or_for_small_files() -> None:
    stream = io.StringIO()
    assert ProgressLine(stream, enabled=False)(_entry(50_000_000)) is None
    enabled = ProgressLine(stream, enabled=True)
    assert enabled(_entry(999_999)) is None
    assert enabled.current is not None and enabled.current.size == 999_999  # still known
    assert stream.getvalue() == ""


def test_an_interrupted_line_is_ended_before_the_next_message() -> None:
    stream, clock = io.StringIO(), _Clock()
    line = ProgressLine(stream, enabled=True, clock=clock)
    show = line(_entry(3_000_000))
    assert show is not None
    show(1_000_000, 3_000_000)
    assert not stream.getvalue().endswith("\n")
    line.end()
    assert stream.getvalue().endswith("\n")
