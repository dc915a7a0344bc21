"""Server-side rollouts: the pure rules (advance, due) by tables, then the driver with a
real mosquitto, the real Ingester and both databases, fake devices that act on their
desired state as agents do, restarts and a second instance taking over."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from agent.server.rollouts import (
    Member,
    Observed,
    Publication,
    Rollout,
    Step,
    advance,
    due,
    fingerprint,
)

T0 = 1_800_000_000.0


def _issuer() -> Any:
    counter = itertools.count(1)
    return lambda: T0 + next(counter)


def _rollout(**kw: Any) -> Rollout:
    base = Rollout("r1", "door", "colours", 2, "running", 0, 2, 60.0, True)
    return replace(base, **kw)


def _update(
    issued_at: float, phase: str = "downloading", outcome: str | None = None
) -> dict[str, Any]:
    return {
        "model": "colours", "version": 2, "desired": None, "bad": [],
        "update": {"id": "u1", "model": "colours", "version": 2, "issued_at": issued_at,
                   "phase": phase, "outcome": outcome, "reason": None, "retry": None},
    }  # fmt: skip


def _seen(
    state: dict[str, Any] | None, at: float, issued_at: float, online: bool = True
) -> Observed:
    running = (state.get("model"), state.get("version")) if state else ("colours", 1)
    if state and (state["update"] or {}).get("outcome") != "succeeded":
        running = ("colours", 1)
    return Observed(state, online, running, fingerprint(state, at, [], None, issued_at))


def test_a_rollout_issues_each_step_judges_it_then_sets_the_group() -> None:
    issue = _issuer()
    r = _rollout()
    steps = [Step(0, 1), Step(1, 2)]
    members = [Member("a", 0), Member("b", 1), Member("c", 1)]
    before = {d: Observed(None, True, ("colours", 1)) for d in "abc"}
    got = advance(r, steps, members, before, T0, issue)
    assert got.steps[0].status == "running"
    a = got.members[0]
    assert (a.outcome, a.issued_at, a.prior) == ("pending", T0 + 1, ("colours", 1))
    assert [m.outcome for m in got.members[1:]] == [None, None]  # later steps untouched
    pubs = due(got.rollout, got.members, "edge")
    assert pubs == [Publication("edge/a/desired", "device:a", "colours", 2, T0 + 1, "a", "issue")]
    # sent: now judged; first look records the fingerprint, the device is pending
    members = [replace(got.members[0], sent=T0 + 2), *got.members[1:]]
    got = advance(got.rollout, got.steps, members, before, T0 + 3, issue)
    assert got.members[0].outcome == "pending"
    assert due(got.rollout, got.members, "edge") == []
    done = _seen(_update(T0 + 1, "probation", "succeeded"), T0 + 10, T0 + 1)
    got = advance(got.rollout, got.steps, got.members, {**before, "a": done}, T0 + 10, issue)
    assert got.members[0].outcome == "succeeded" and got.members[0].seconds == 8.0
    assert got.steps[0].status == "succeeded" and got.rollout.step == 1
    assert [m.outcome for m in got.members[1:]] == ["pending", "pending"]
    assert {p.device for p in due(got.rollout, got.members, "edge")} == {"b", "c"}
    members = [replace(m, sent=T0 + 11) if m.step == 1 else m for m in got.members]
    seen = {d: _seen(_update(m.issued_at or 0, "probation", "succeeded"), T0 + 12, m.issued_at or 0)
            for d, m in zip("bc", members[1:], strict=True)}  # fmt: skip
    got = advance(got.rollout, got.steps, members, {**before, **seen}, T0 + 12, issue)
    assert got.rollout.status == "finishing" and got.rollout.final_issued_at is not None
    pubs = due(got.rollout, got.members, "edge")
    assert pubs[0] == Publication(
        "edge/groups/door/desired", "group:door", "colours", 2, got.rollout.final_issued_at,
        None, "final",
    )  # fmt: skip
    assert [(p.topic, p.model) for p in pubs[1:]] == [
        ("edge/a/desired", None), ("edge/b/desired", None), ("edge/c/desired", None)
    ]  # fmt: skip


def _sent(
    state: dict[str, Any] | None = None, **kw: Any
) -> tuple[Rollout, list[Step], list[Member]]:
    r = _rollout(**kw)
    steps = [Step(0, 2, "running", T0), Step(1, 1)]
    members = [
        Member("a", 0, T0, T0, "pending", "sent", T0, ("colours", 1), seen=[None, 0, None]),
        Member("b", 0, T0 + 0.5, T0, "pending", "sent", T0, ("colours", 1), seen=[None, 0, None]),
        Member("c", 1),
    ]
    return r, steps, members


OK = Observed(_update(T0, "probation", "succeeded"), True, ("colours", 2), [T0 + 5, 0, None])


@pytest.mark.parametrize(
    ("a_seen", "now", "status", "a_outcome", "take_back"),
    [
        # the device rolled back: halted, its per-device desired state is cleared
        (Observed(_update(T0, "probation", "rolled_back"), True, ("colours", 1), [T0 + 5, 0, None]),
         T0 + 10, "halting", "failed", "clear"),
        # silent for timeout_s: failed, set back to what it ran
        (Observed(None, True, ("colours", 1), [None, 0, None]), T0 + 61, "halting", "failed",
         "set_back"),
        # silent for less: still pending, nothing decided
        (Observed(None, True, ("colours", 1), [None, 0, None]), T0 + 59, "running", "pending",
         None),
        # reported progress 30 s ago, 70 s after sending: not silent
        (Observed(_update(T0, "probation"), True, ("colours", 1), [T0 + 40, 0, None]), T0 + 70,
         "running", "pending", None),
        # refused the desired state by an event
        (Observed(None, True, ("colours", 1), [None, 0, None], "ignored the desired state: stale"),
         T0 + 1, "halting", "failed", "clear"),
    ],
)  # fmt: skip
def test_a_failure_in_a_step_halts_with_take_back(
    a_seen: Observed, now: float, status: str, a_outcome: str, take_back: str | None
) -> None:
    r, steps, members = _sent()
    b_ok = replace(OK, state=_update(T0 + 0.5, "probation", "succeeded"))
    heard = now - 30 if a_seen.state is not None and a_seen.state.get("update") else None
    if heard is not None:  # news 30 s ago: the fingerprint moved then
        members = [replace(members[0], last_heard=heard, seen=a_seen.fingerprint), *members[1:]]
    got = advance(r, steps, members, {"a": a_seen, "b": b_ok}, now, _issuer())
    a, b, c = got.members
    assert got.rollout.status == status
    assert (a.outcome, a.take_back, b.outcome, b.take_back) == (
        a_outcome,
        take_back,
        "succeeded",
        None,
    )
    assert c.outcome is None and c.issued_at is None  # never reached
    if status == "halting":
        assert got.rollout.reason == "canary failed on a"
        pubs = due(got.rollout, got.members, "edge")
        assert len(pubs) == 1 and pubs[0].topic == "edge/a/desired"
        if take_back == "set_back":
            assert (pubs[0].model, pubs[0].version) == ("colours", 1)
            assert a.timed_out and a.take_back_at is not None
        else:
            assert pubs[0].model is None  # cleared
        sent = [replace(m, take_back_sent=now) if m.take_back else m for m in got.members]
        end = advance(got.rollout, got.steps, sent, {}, now + 1, _issuer())
        assert end.rollout.status == "halted" and due(end.rollout, end.members, "edge") == []


def test_pause_keeps_judging_but_issues_nothing_and_resume_goes_on() -> None:
    r, steps, members = _sent(status="paused")
    b_ok = replace(OK, state=_update(T0 + 0.5, "probation", "succeeded"))
    got = advance(r, steps, members, {"a": OK, "b": b_ok}, T0 + 10, _issuer())
    assert [m.outcome for m in got.members] == ["succeeded", "succeeded", None]
    assert got.steps[0].status == "succeeded" and got.rollout.step == 0
    assert due(got.rollout, got.members, "edge") == []
    resumed = advance(replace(got.rollout, status="running"), got.steps, got.members, {}, T0 + 11,
                      _issuer())  # fmt: skip
    assert resumed.rollout.step == 1 and resumed.members[2].outcome == "pending"


def test_abort_takes_back_the_pending_devices_of_the_current_step() -> None:
    r, steps, members = _sent(status="aborting", reason="aborted by ops")
    members[1] = replace(members[1], outcome="succeeded")
    got = advance(r, steps, members, {}, T0 + 5, _issuer())
    a, b, c = got.members
    assert (a.take_back, b.take_back, c.take_back) == ("set_back", None, None)
    assert got.rollout.status == "aborting"
    pubs = due(got.rollout, got.members, "edge")
    assert [(p.device, p.version) for p in pubs] == [("a", 1)]
    done = [replace(m, take_back_sent=T0 + 6) if m.take_back else m for m in got.members]
    assert advance(got.rollout, got.steps, done, {}, T0 + 7, _issuer()).rollout.status == "aborted"


def test_a_re_look_with_the_same_fingerprint_is_not_news() -> None:
    r, steps, members = _sent()
    quiet = Observed(None, True, ("colours", 1), [None, 0, None])
    got = advance(r, steps, members, {"a": quiet, "b": quiet}, T0 + 30, _issuer())
    assert [m.last_heard for m in got.members[:2]] == [T0, T0]
    moved = Observed(None, True, ("colours", 1), [None, 1, None])
    got = advance(r, steps, got.members, {"a": moved, "b": quiet}, T0 + 40, _issuer())
    assert [m.last_heard for m in got.members[:2]] == [T0 + 40, T0]


@pytest.mark.parametrize(
    ("state", "events", "telemetry_ts", "expected"),
    [
        (None, [], None, [None, 0, None]),
        (_update(T0), [], 99.0, [5.0, 0, None]),  # downloading: telemetry is no news
        (_update(T0, "probation"), [], 99.0, [5.0, 0, 99.0]),
        (_update(T0 - 9, "probation"), [], 99.0, [None, 0, None]),  # another desired state
        (_update(T0), [{"event": "update_progress", "issued_at": T0},
                       {"event": "update_phase", "update_id": "u1"},
                       {"event": "update_phase", "update_id": "u0"}], None, [5.0, 2, None]),
    ],
)  # fmt: skip
def test_fingerprint_moves_only_with_news_about_this_desired_state(
    state: dict[str, Any] | None, events: list[dict[str, Any]], telemetry_ts: float | None,
    expected: list[Any],
) -> None:  # fmt: skip
    assert fingerprint(state, 5.0, events, telemetry_ts, T0) == expected
