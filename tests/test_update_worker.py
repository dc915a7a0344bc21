"""The update worker driven through its seam: a ``Steps`` and ``Serving`` of our own, a
real store and journal on disk, no broker, no registry, no model.

What is proved: a damaged journal is set aside and reported at start (the agent goes on
with a fresh one); requests from other threads go through the worker's queue (a
rollback while an update downloads is refused as busy and never runs later); the
worker records each outcome in the journal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.commands import CommandError
from agent.config import Config, config_from_dict
from agent.store import Pointer, Release, Store
from agent.update.journal import JOURNAL, parse
from agent.update.policy import Failed
from agent.update.worker import Updates


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.states: list[dict[str, Any]] = []

    def event(self, name: str, detail: Mapping[str, Any] | None = None) -> None:
        self.events.append((name, dict(detail or {})))

    def state(self, state: Mapping[str, Any]) -> None:
        self.states.append(dict(state))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in list(self.events) if n == name]


class NoServing:
    def load(self, release: Release) -> Any:
        raise AssertionError("not loaded in these tests")

    def swap(self, model: Any, timeout: float) -> None:
        raise AssertionError("not swapped in these tests")

    def stats(self) -> None:
        return None


class FakeSteps:
    """Stage blocks until ``release`` is set, then does what ``outcome`` says."""

    def __init__(self) -> None:
        self.staging = threading.Event()
        self.release = threading.Event()
        self.outcome: Callable[[], Release | None] = lambda: None
        self.rollbacks: list[int | None] = []

    def read_channel(self) -> int:
        return 2

    def poll_channel(self, etag: str | None) -> tuple[int | None, str | None]:
        return None, etag

    def stage(
        self,
        model: str,
        version: int,
        *,
        allow_downgrade: bool,
        on_phase: Callable[[str], None],
        progress: Any = None,
    ) -> Release | None:
        on_phase("downloading")
        self.staging.set()
        assert self.release.wait(10)
        return self.outcome()

    def validate(self, release: Release) -> tuple[Any, Mapping[str, Any]]:
        raise AssertionError("not reached")

    def activate(self, release: Release, model: Any, timeout: float) -> None:
        raise AssertionError("not reached")

    def serve(self, release: Release) -> None:
        raise AssertionError("not reached")

    def roll_back(self, release: Release, *, from_version: int, serve: bool) -> None:
        raise AssertionError("not reached")

    def rollback_command(self, to: int | None) -> tuple[Pointer | None, Release]:
        self.rollbacks.append(to)
        raise CommandError("nothing to roll back to")

    def restore(self, before: Pointer | None) -> None:
        pass

    def clean_up(self) -> None:
        pass


def _config(tmp_path: Path) -> Config:
    return config_from_dict(
        {
            "device": {"id": "dev-w"},
            "model": {"name": "colours"},
            "registry": {"url": "http://127.0.0.1:9/", "poll_interval_s": 3600},
            "store": {"dir": str(tmp_path / "store"), "reserve_mb": 0},
            "source": {"type": "synthetic"},
        }
    )


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Config, Store, Recorder, FakeSteps]]:
    config = _config(tmp_path)
    store = Store(config.store.dir, config.store.keep).open()
    steps = FakeSteps()
    yield config, store, Recorder(), steps
    steps.release.set()


def _updates(parts: tuple[Config, Store, Recorder, FakeSteps]) -> Updates:
    config, store, reporter, steps = parts
    return Updates(
        config,
        store,
        NoServing(),
        reporter,
        lambda r, m: {},
        steps=steps,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "damage",
    [
        b'{"schema": 1, "attempt": {"id": "a',
        b"\x00\x00\x00",
        b'{"attempt": 5}',
        b"[]",
        b'{"schema": 1, "crashes": {"colours@2": "many"}}',
    ],
)
def test_damaged_journal_is_set_aside_reported_and_replaced_by_a_fresh_one(
    parts: tuple[Config, Store, Recorder, FakeSteps], damage: bytes
) -> None:
    _, store, reporter, _ = parts
    path = store.root / JOURNAL
    path.write_bytes(damage)
    updates = _updates(parts)
    updates.recover()
    (event,) = reporter.named("state_repaired")
    assert event["file"] == str(path) and "updates.json.damaged-" in event["action"]
    assert event["problem"] and event["kept_as"].startswith(str(path) + ".damaged-")
    (aside,) = store.root.glob(f"{JOURNAL}.damaged-*")
    assert aside.read_bytes() == damage
    assert parse(path.read_bytes()).attempt is None  # a fresh, valid journal
    assert updates.state()["update"] is None


def test_rollback_while_an_update_downloads_is_refused_busy_and_never_runs_later(
    parts: tuple[Config, Store, Recorder, FakeSteps],
) -> None:
    _, store, _, steps = parts
    updates = _updates(parts)
    updates.recover()
    updates.start()
    try:
        assert updates.request_pull(2) == {"model": "colours", "version": 2, "queued": True}
        assert steps.staging.wait(10)
        started = time.monotonic()
        with pytest.raises(
            CommandError, match=r"busy: an update is in progress \(v2, downloading\)"
        ):
            updates.rollback(None)
        assert time.monotonic() - started < 5
        steps.outcome = lambda: None  # "already active"
        steps.release.set()
        deadline = time.monotonic() + 10
        while updates.phase() != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert updates.phase() == "succeeded"
        time.sleep(0.3)  # the worker is idle now: a rollback left queued would run
        assert steps.rollbacks == []
        with pytest.raises(CommandError, match="nothing to roll back to"):
            updates.rollback(None)  # idle: the worker takes it and answers
        assert steps.rollbacks == [None]
    finally:
        assert updates.stop()
    journal = parse((store.root / JOURNAL).read_bytes())
    assert journal.attempt is not None and journal.attempt.outcome == "succeeded"
    assert journal.attempt.source == "local"


def test_transient_stage_failure_is_journaled_and_reported_for_retry(
    parts: tuple[Config, Store, Recorder, FakeSteps],
) -> None:
    _, store, reporter, steps = parts

    def fail() -> Release | None:
        raise Failed("download failed: reset", transient=True)

    steps.outcome = fail
    steps.release.set()
    updates = _updates(parts)
    updates.start()
    try:
        updates.request_pull(2)
        deadline = time.monotonic() + 10
        while not reporter.named("update_failed") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert updates.stop()
    (failed,) = reporter.named("update_failed")
    assert failed["retry"] is True and failed["reason"] == "download failed: reset"
    attempt = parse((store.root / JOURNAL).read_bytes()).attempt
    assert attempt is not None and (attempt.outcome, attempt.transient) == ("failed", True)
