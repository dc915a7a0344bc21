"""State files the agent reads at start are read bounded, never through a link and
never from a FIFO or a device: one planted or damaged in place of ``updates.json``,
``<outbox>.seq`` or ``index-seen.json`` must neither hang the start (a FIFO blocks an
ordinary open for ever) nor exhaust memory (a link to /dev/zero reads without end).
Each is treated as the damaged file it is: set aside or started afresh, at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from agent.outbox import Outbox, Record
from agent.signed_index import HISTORY_FILE, IndexHistory
from agent.update.journal import Journal

BOUND_S = 5.0


def _plant(path: Path) -> None:
    # (a link to /dev/zero is refused the same way, as not a regular file; it is not
    # planted here because the unfixed code reads it until memory runs out)
    os.mkfifo(path)


def _returns_at_once(path: Path, read: Callable[[], object]) -> None:
    """``read()`` returns within BOUND_S; a reader stuck on the FIFO is released after."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            read()
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    finished = done.wait(BOUND_S)
    if not finished and path.is_fifo():  # let a blocked open return, so the test ends
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(BOUND_S)
    assert finished, f"reading {path.name} did not return within {BOUND_S:g} s"
    assert errors == []


def test_a_fifo_planted_as_the_journal_is_set_aside_at_once(tmp_path: Path) -> None:
    path = tmp_path / "updates.json"
    _plant(path)
    loaded: list[Journal] = []
    _returns_at_once(path, lambda: loaded.append(Journal.load(path)))
    assert loaded[0].repair is not None
    assert not path.exists() and not path.is_symlink()  # moved aside, not followed


def test_a_fifo_planted_as_the_index_history_is_treated_as_empty_at_once(tmp_path: Path) -> None:
    _plant(tmp_path / HISTORY_FILE)

    def read() -> None:
        with IndexHistory(tmp_path) as history:
            assert history.get("person-detector") is None

    _returns_at_once(tmp_path / HISTORY_FILE, read)


def test_a_fifo_planted_as_the_outbox_high_water_mark_is_rewritten_at_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _plant(Path(f"{path}.seq"))
    outboxes: list[Outbox] = []
    _returns_at_once(Path(f"{path}.seq"), lambda: outboxes.append(Outbox(path, 1 << 20).open()))
    outbox = outboxes[0]
    try:
        outbox.write([Record("events", "edge/d/events", {"ts": 1.0})])
        assert len(outbox.pending(0, 10)) == 1
    finally:
        outbox.close()
    assert Path(f"{path}.seq").is_file() and not Path(f"{path}.seq").is_symlink()


def test_a_folder_planted_as_the_outbox_high_water_mark_is_moved_aside(tmp_path: Path) -> None:
    # os.replace onto a folder fails: every start would fail (a crash loop) if it stayed
    path = tmp_path / "outbox.db"
    Path(f"{path}.seq").mkdir()
    outbox = Outbox(path, 1 << 20).open()
    try:
        outbox.write([Record("events", "edge/d/events", {"ts": 1.0})])
        assert len(outbox.pending(0, 10)) == 1
    finally:
        outbox.close()
    assert Path(f"{path}.seq").is_file()
    assert len(list(tmp_path.glob("outbox.db.seq.damaged-*"))) == 1
