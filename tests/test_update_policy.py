"""The update rules, table by table: pure functions over plain values (no I/O, no clock).

``agent.update.policy`` (what to apply, retries, failure classes, recovery at start),
``agent.update.probation`` (judging the stream over the window) and
``agent.update.journal.parse`` (the journal's bytes, checked field by field).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import (
    AcceleratorError,
    ModelError,
    RefusedError,
    StoreError,
    TransportError,
    ValidationError,
    VerificationError,
)
from agent.update import policy
from agent.update.journal import Attempt, JournalDamaged, JournalDoc, parse
from agent.update.policy import Step
from agent.update.probation import Probation


@dataclass(frozen=True)
class T:
    model: str
    version: int
    issued_at: float


@dataclass(frozen=True)
class U:
    model: str
    version: int
    issued_at: float | None


# -- failure classes --------------------------------------------------------------------

CLASSES: list[tuple[Step, BaseException, str | None, bool, bool]] = [
    # step, exception, reason starts, transient, bad
    ("stage", TransportError("reset"), "download failed: reset", True, False),
    ("stage", StoreError("disk full"), "store: disk full", True, False),
    ("stage", RefusedError("downgrade"), "refused: downgrade", False, False),
    ("stage", VerificationError("hash"), "VerificationError: hash", False, False),
    ("stage", KeyError("bug"), None, False, False),
    ("load", AcceleratorError("no TPU"), "cannot load on this device: no TPU", True, False),
    ("load", ModelError("bad op"), "cannot load on this device: bad op", False, True),
    ("load", MemoryError(), "cannot load on this device: out of memory", False, True),
    ("load", ValueError("bug"), None, False, False),
    ("validate", ValidationError("selftest"), "validation: selftest", False, True),
    ("validate", MemoryError(), "validation: out of memory", False, True),
    ("validate", AcceleratorError("tpu"), "validation could not run: tpu", True, False),
    ("validate", StoreError("unreadable"), "validation could not run: unreadable", True, False),
    ("activate", ModelError("not taken"), "activation: not taken", True, False),
    ("activate", StoreError("busy"), "activation: busy", True, False),
    ("activate", RuntimeError("bug"), None, False, False),
]


@pytest.mark.parametrize(("step", "exc", "reason", "transient", "bad"), CLASSES)
def test_failures_are_classified_transient_bad_or_refused_by_step(
    step: Step, exc: BaseException, reason: str | None, transient: bool, bad: bool
) -> None:
    failure = policy.classify(step, exc)
    if reason is None:
        assert failure is None  # a bug: the worker ends it as an internal error
        return
    assert failure is not None
    assert (failure.reason, failure.transient, failure.bad) == (reason, transient, bad)


# -- retries ----------------------------------------------------------------------------

RETRIES: list[tuple[str, bool, bool, int, float, policy.Retry | None]] = [
    # outcome, transient, from_desired, tries, jitter -> retry
    ("failed", True, False, 0, 1.0, policy.Retry(5.0, 1)),
    ("failed", True, False, 1, 1.0, policy.Retry(10.0, 2)),
    ("failed", True, True, 3, 0.5, policy.Retry(20.0, 4)),
    ("failed", True, False, 10, 1.0, policy.Retry(600.0, 11)),  # capped at retry_max_s
    ("failed", True, False, 10_000, 1.0, policy.Retry(600.0, 10_001)),  # no overflow
    ("failed", False, False, 0, 1.0, policy.Retry(600.0, 0)),  # a channel's refusal
    ("failed", False, True, 0, 1.0, None),  # a desired state: done once
    ("rolled_back", False, False, 0, 1.0, None),
    ("succeeded", False, False, 2, 1.0, None),
]


@pytest.mark.parametrize(("outcome", "transient", "desired", "tries", "jitter", "want"), RETRIES)
def test_retry_schedule_backs_off_transient_failures_and_never_loops_on_refusals(
    outcome: str,
    transient: bool,
    desired: bool,
    tries: int,
    jitter: float,
    want: policy.Retry | None,
) -> None:
    got = policy.retry_after(
        outcome,
        transient=transient,
        from_desired=desired,
        tries=tries,
        retry_max_s=600.0,
        jitter=jitter,
    )
    assert got == want


# -- what to apply --------------------------------------------------------------------------

D = T("m", 2, 100.0)
DESIRED: list[tuple[str, dict[str, Any], str, bool]] = [
    # case, inputs, verdict, record
    ("new instruction", {}, "apply", False),
    ("same instruction done", {"applied": ("m", 2, 100.0)}, "skip", False),
    ("older than the applied one", {"applied": ("m", 3, 150.0)}, "ignore", False),
    ("newer than the applied one", {"applied": ("m", 1, 50.0)}, "apply", False),
    ("marked bad after it was issued", {"bad_at": 120.0}, "ignore", True),
    ("marked bad before: a deliberate retry", {"bad_at": 80.0}, "apply", False),
    ("already running it", {"active": ("m", 2)}, "done", False),
    ("running it, mid-update", {"active": ("m", 2), "updating": True}, "apply", False),
    ("waiting for a retry", {"due": False}, "skip", False),
    # an applied state from the future (accepted before such states were refused)
    ("applied one is future-dated", {"applied": ("m", 3, 9e9), "now": 200.0}, "apply", False),
    (
        "applied one within the skew",
        {"applied": ("m", 3, 450.0), "now": 200.0, "max_skew_s": 300.0},
        "ignore",
        False,
    ),
]


@pytest.mark.parametrize(
    ("case", "inputs", "verdict", "record"), DESIRED, ids=[c[0] for c in DESIRED]
)
def test_desired_state_is_applied_once_and_stale_or_bad_ones_are_ignored(
    case: str, inputs: dict[str, Any], verdict: str, record: bool
) -> None:
    args: dict[str, Any] = {"applied": None, "bad_at": None, "active": None}
    args |= {"updating": False, "due": True} | inputs
    got = policy.judge_desired(D, **args)
    assert (got.verdict, got.record) == (verdict, record)
    assert bool(got.reason) == (verdict == "ignore")


@pytest.mark.parametrize(
    ("winner", "attempt", "want"),
    [
        (None, U("m", 2, 100.0), False),
        (T("m", 2, 200.0), U("m", 2, 100.0), False),  # the same release
        (T("m", 3, 200.0), U("m", 2, 100.0), True),  # newer, another release
        (T("m", 3, 50.0), U("m", 2, 100.0), False),  # older: a cleared device state
        (T("m", 3, 100.0), U("m", 2, 100.0), False),  # not newer
        (T("m", 3, 1.0), U("m", 2, None), True),  # the update came from the channel
    ],
)
def test_only_a_newer_instruction_for_another_release_supersedes_an_update(
    winner: T | None, attempt: U, want: bool
) -> None:
    assert policy.supersedes(winner, attempt) is want


@pytest.mark.parametrize(
    ("active", "bad", "held", "want"),
    [
        (None, False, False, True),
        (("m", 1), False, False, True),
        (("m", 2), False, False, False),  # running it
        (("m", 1), True, False, False),  # failed here
        (("m", 3), False, True, False),  # never backwards
    ],
)
def test_channel_version_is_wanted_unless_active_bad_or_held(
    active: tuple[str, int] | None, bad: bool, held: bool, want: bool
) -> None:
    assert policy.channel_wants("m", 2, active=active, bad=bad, held=held) is want


# -- recovery at start ----------------------------------------------------------------------

RECOVERY: list[tuple[str, dict[str, Any], str, bool, bool]] = [
    # case, inputs, action, bad, transient
    ("downloading, killed", {"phase": "downloading"}, "fail", False, True),
    ("verifying, stopped", {"phase": "verifying", "clean_stop": True}, "fail", False, True),
    ("validating, 2nd death", {"phase": "validating", "crashes": 1}, "fail", False, True),
    ("validating, 3rd death", {"phase": "validating", "crashes": 2}, "fail", True, False),
    ("activating, not on it", {"phase": "activating", "crashes": 2}, "fail", True, False),
    ("activating, on it", {"phase": "activating", "on_target": True}, "probation", False, False),
    ("probation, killed", {"phase": "probation", "on_target": True}, "probation", False, False),
    (
        "probation, crash loop",
        {"phase": "probation", "on_target": True, "starts": 2},
        "roll_back",
        True,
        False,
    ),
    (
        "probation, stopped cleanly",
        {"phase": "probation", "on_target": True, "starts": 2, "clean_stop": True},
        "probation",
        False,
        False,
    ),
    (
        "offline pull",
        {"phase": "validating", "on_target": True, "offline_pull": True, "clean_stop": True},
        "gate",
        False,
        False,
    ),
    (
        "offline pull, dies in its gate",
        {"phase": "validating", "on_target": True, "offline_pull": True, "crashes": 2},
        "roll_back",
        True,
        False,
    ),
]


@pytest.mark.parametrize(
    ("case", "inputs", "action", "bad", "transient"), RECOVERY, ids=[c[0] for c in RECOVERY]
)
def test_restart_settles_the_interrupted_update_by_phase_and_crash_count(
    case: str, inputs: dict[str, Any], action: str, bad: bool, transient: bool
) -> None:
    args: dict[str, Any] = {
        "phase": "downloading",
        "offline_pull": False,
        "on_target": False,
        "clean_stop": False,
        "crashes": 0,
        "starts": 0,
        "limit": 3,
        "probation_until": None,
        "window_s": 120.0,
        "now": 1000.0,
    } | inputs
    got = policy.recover(**args)
    assert (got.action, got.bad, got.transient) == (action, bad, transient)
    assert bool(got.reason) == (action in ("fail", "roll_back"))


@pytest.mark.parametrize(
    ("until", "left"),
    [(None, 120.0), (1060.0, 60.0), (900.0, 0.0), (10_000_000.0, 120.0)],  # clock stepped
)
def test_probation_left_after_a_restart_is_clamped_to_the_window(
    until: float | None, left: float
) -> None:
    got = policy.recover(
        phase="probation",
        offline_pull=False,
        on_target=True,
        clean_stop=True,
        crashes=0,
        starts=0,
        limit=3,
        probation_until=until,
        window_s=120.0,
        now=1000.0,
    )
    assert got.probation_left_s == left


# -- probation ------------------------------------------------------------------------------

PROBATION: list[tuple[str, tuple[int, int] | None, float, str]] = [
    # case, (errors, results) since the baseline (10, 100), now, verdict
    ("quiet and early", (10, 150), 5.0, "watching"),
    ("not serving", None, 5.0, "failed"),
    ("errors below the minimum", (14, 100), 5.0, "watching"),
    ("many errors, high rate", (20, 105), 5.0, "failed"),
    ("many errors, low rate", (20, 1100), 5.0, "watching"),
    ("window over", (12, 300), 10.0, "passed"),
    ("window over but failing", (40, 100), 10.0, "failed"),
]


@pytest.mark.parametrize(
    ("case", "counters", "now", "verdict"), PROBATION, ids=[c[0] for c in PROBATION]
)
def test_probation_judges_errors_since_it_began_over_its_window(
    case: str, counters: tuple[int, int] | None, now: float, verdict: str
) -> None:
    judge = Probation(10.0, min_errors=5, max_error_rate=0.5, baseline=(10, 100))
    got = judge.judge(counters, now)
    assert got.verdict == verdict and got.reason


def test_probation_counts_only_what_happened_after_its_baseline() -> None:
    judge = Probation(10.0, min_errors=5, max_error_rate=0.5)
    assert judge.judge((1000, 0), 0.0).verdict == "watching"  # the old model's errors
    assert judge.judge((1006, 1), 1.0).verdict == "failed"


# -- the journal's bytes ---------------------------------------------------------------------

GOOD_ATTEMPT = {
    "id": "abc",
    "model": "m",
    "version": 2,
    "source": "device",
    "issued_at": 100.0,
    "previous": ["m", 1],
    "phase": "probation",
}

DAMAGED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not JSON"),
    ("truncated", b'{"schema": 1, "attempt": {"id": "a', "not JSON"),
    ("NUL bytes", b"\x00" * 32, "not JSON"),
    ("not UTF-8", b"\xff\xfe{}", "not JSON"),
    ("deep", b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ("a list", b"[]", "must be an object"),
    ("attempt a number, no schema", b'{"attempt": 5}', "schema"),
    ("attempt a number", b'{"schema": 1, "attempt": 5}', "attempt: must be an object"),
    ("no schema", b'{"attempt": null}', "schema"),
    ("other schema", b'{"schema": 2}', "schema"),
    (
        "version a string",
        json.dumps({"schema": 1, "attempt": {**GOOD_ATTEMPT, "version": "2"}}).encode(),
        "attempt.version",
    ),
    (
        "version a bool",
        json.dumps({"schema": 1, "attempt": {**GOOD_ATTEMPT, "version": True}}).encode(),
        "attempt.version",
    ),
    (
        "unknown phase",
        json.dumps({"schema": 1, "attempt": {**GOOD_ATTEMPT, "phase": "x"}}).encode(),
        "attempt.phase",
    ),
    (
        "previous a string",
        json.dumps({"schema": 1, "attempt": {**GOOD_ATTEMPT, "previous": "m@1"}}).encode(),
        "attempt.previous",
    ),
    (
        "id missing",
        json.dumps(
            {"schema": 1, "attempt": {k: v for k, v in GOOD_ATTEMPT.items() if k != "id"}}
        ).encode(),
        "attempt.id",
    ),
    (
        "unknown attempt field",
        json.dumps({"schema": 1, "attempt": {**GOOD_ATTEMPT, "x": 1}}).encode(),
        "unknown field",
    ),
    (
        "infinite deadline",
        b'{"schema": 1, "attempt": {"id": "a", "model": "m", "version": 1, "source": "d", '
        b'"deadline_s": Infinity}}',
        "deadline_s",
    ),
    ("crash count a string", b'{"schema": 1, "crashes": {"m@1": "many"}}', "crashes"),
    ("bad not a list", b'{"schema": 1, "bad": {}}', "bad"),
    ("bad mark a number", b'{"schema": 1, "bad": [1]}', "bad[0]"),
    ("applied a list", b'{"schema": 1, "applied": []}', "applied"),
    (
        "applied issued_at a string",
        b'{"schema": 1, "applied": {"model": "m", "version": 1, "issued_at": "x", '
        b'"source": "device"}}',
        "applied.issued_at",
    ),
    ("pinned a string", b'{"schema": 1, "pinned": "yes"}', "pinned"),
    ("huge digits", b'{"schema": 1, "crashes": {"m@1": 1' + b"0" * 5000 + b"}}", "not JSON"),
]


@pytest.mark.parametrize(("case", "data", "names"), DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_journal_bytes_are_refused_naming_what_is_wrong(
    case: str, data: bytes, names: str
) -> None:
    with pytest.raises(JournalDamaged, match=names.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


def test_journal_round_trips_through_its_bytes() -> None:
    doc = JournalDoc(attempt=Attempt("a", "m", 2, "device", 100.0, ("m", 1), phase="probation"))
    doc.mark_bad("m", 3, "selftest", 50.0)
    doc.crashes["m@2"] = 1
    doc.pinned = True
    again = parse(doc.to_bytes())
    assert again == doc
    assert parse(b'{"schema": 1}') == JournalDoc()


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_any_json_value_is_a_journal_or_journal_damaged(value: Any) -> None:
    for doc in (value, {"schema": 1, "attempt": value}, {"schema": 1, "bad": value}):
        try:
            data = json.dumps(doc).encode()
        except ValueError:
            continue
        with contextlib.suppress(JournalDamaged):
            parse(data)
