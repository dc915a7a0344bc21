"""Server-side shadow rollouts: the pure rules (advance, due with a rollout's shadow
options, agent.server.rollshadow) by tables — each step's members run the candidate in
the shadow first, a failed trial halts and clears every instruction the rollout made,
with promote_at a passed step issues its desired states, without it the group takes
the run over at the end."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from agent.server import rollstore
from agent.server.db import open_database
from agent.server.rollouts import (
    Member,
    Observed,
    Publication,
    Rollout,
    Step,
    advance,
    due,
)
from agent.server.rollshadow import Shadow, shadow_of
from agent.server.schema import deploys

T0 = 1_800_000_000.0
AT = T0 - 100  # the rollout's one issued_at of its instructions
IDLE = Observed(None, True, ("colours", 1))


def _issuer() -> Any:
    counter = itertools.count(1)
    return lambda: T0 + next(counter)


def _rollout(promote_at: float | None = 0.9, **kw: Any) -> Rollout:
    shadow = Shadow(AT, 100, 25, 8, promote_at)
    base = Rollout("r1", "door", "colours", 2, "running", 0, 2, 60.0, True, shadow=shadow)
    return replace(base, **kw)


def _run(
    phase: str = "running", frames: int = 10, value: float | None = 1.0, errors: int = 0,
    issued_at: float = AT, error: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "model": "colours", "version": 2, "issued_at": issued_at, "phase": phase,
        "sample_pct": 100, "max_cpu_pct": 25, "frames": frames, "skipped": 0, "errors": errors,
        "error": error, "latency_ms_p50": 2.0, "active_latency_ms_p50": 1.5,
        "agreement": {"metric": "top1", "value": value, "frames": frames},
    }  # fmt: skip


def _applied(issued_at: float, outcome: str = "succeeded") -> dict[str, Any]:
    return {
        "model": "colours", "version": 2 if outcome == "succeeded" else 1, "desired": None,
        "bad": [], "update": {"id": "u1", "model": "colours", "version": 2,
        "issued_at": issued_at, "phase": "probation", "outcome": outcome, "reason": "x",
        "retry": None},
    }  # fmt: skip


def _seen(run: dict[str, Any] | None, refusal: str | None = None) -> Observed:
    return Observed(None, True, ("colours", 1), run=run, trial_refusal=refusal)


def _tried(**kw: Any) -> tuple[Rollout, list[Step], list[Member]]:
    """The canary's trial sent at T0, the other device in step 1."""
    r = _rollout(**kw)
    steps = [Step(0, 1, "running", T0), Step(1, 1)]
    members = [
        Member("a", 0, trial="pending", trial_reason="sent", trial_sent=T0, trial_heard=T0),
        Member("b", 1),
    ]
    return r, steps, members


def test_options_round_trip_and_unreadable_ones_are_no_shadow() -> None:
    shadow = Shadow(AT, 10, 25, 100, None)
    assert shadow_of({"shadow": shadow.to_dict()}) == shadow
    assert shadow_of({}) is None and shadow_of({"shadow": {"sample_pct": 5}}) is None


def test_a_step_sends_instructions_first_then_with_promote_at_the_desired_states() -> None:
    issue = _issuer()
    r = _rollout(step=0)
    steps = [Step(0, 1), Step(1, 1)]
    got = advance(r, steps, [Member("a", 0), Member("b", 1)], {"a": IDLE}, T0, issue)
    a, b = got.members
    assert (a.trial, a.outcome, a.issued_at, b.trial) == ("pending", None, None, None)
    assert due(got.rollout, got.members, "edge") == [
        Publication("edge/a/shadow/colours", "device:a", "colours", 2, AT, "a", "shadow")
    ]
    sent = [replace(a, trial_sent=T0 + 1, trial_heard=T0 + 1), b]
    got = advance(got.rollout, got.steps, sent, {"a": _seen(None)}, T0 + 2, issue)
    assert got.members[0].trial == "pending" and due(got.rollout, got.members, "edge") == []
    passed = advance(got.rollout, got.steps, got.members, {"a": _seen(_run())}, T0 + 9, issue)
    a = passed.members[0]
    assert (a.trial, a.trial_seconds, a.outcome) == ("succeeded", 8.0, "pending")
    assert "top1 1 over 10 frames" in (a.trial_reason or "")
    assert passed.steps[0].status == "running"  # now the desired state
    pubs = due(passed.rollout, passed.members, "edge")
    assert [(p.topic, p.kind, p.model) for p in pubs] == [
        ("edge/a/desired/colours", "issue", "colours"),
        ("edge/a/shadow/colours", "shadow_clear", None),  # after the desired state
    ]
    assert pubs[0].issued_at == a.issued_at
    # the desired state applied (and the instruction cleared): the next step's trials
    done = replace(a, sent=T0 + 10, trial_cleared=T0 + 10, seen=[None, 0, None])
    ok = Observed(_applied(a.issued_at or 0), True, ("colours", 2), [T0 + 11, 0, None])
    got = advance(passed.rollout, passed.steps, [done, b], {"a": ok, "b": IDLE}, T0 + 11, issue)
    assert got.members[0].outcome == "succeeded" and got.rollout.step == 1
    assert got.members[1].trial == "pending" and got.members[1].outcome is None
    # the end: the group's desired state, every member's cleared, the group's shadow topic
    b = replace(got.members[1], trial="succeeded", outcome="succeeded", issued_at=T0 + 20,
                sent=T0 + 20, trial_cleared=T0 + 20)  # fmt: skip
    last = [got.members[0], b]
    steps = [got.steps[0], replace(got.steps[1], status="succeeded")]
    end = advance(got.rollout, steps, last, {}, T0 + 30, issue)
    assert end.rollout.status == "finishing"
    pubs = due(end.rollout, end.members, "edge")
    assert [(p.topic, p.kind) for p in pubs] == [
        ("edge/groups/door/desired/colours", "final"),
        ("edge/a/desired/colours", "clear"),
        ("edge/b/desired/colours", "clear"),
        ("edge/groups/door/shadow/colours", "shadow_clear"),
    ]


def test_without_promote_at_the_trials_are_the_step_and_the_group_takes_the_run() -> None:
    r, steps, members = _tried(promote_at=None)
    got = advance(r, steps, members, {"a": _seen(_run(value=0.5))}, T0 + 5, _issuer())
    a, b = got.members
    assert a.trial == "succeeded" and a.outcome is None and a.issued_at is None
    assert got.steps[0].status == "succeeded" and got.rollout.step == 1
    assert b.trial == "pending"
    assert [p.kind for p in due(got.rollout, got.members, "edge")] == ["shadow"]
    last = [a, replace(b, trial="succeeded", trial_sent=T0 + 6)]
    steps = [got.steps[0], replace(got.steps[1], status="succeeded")]
    end = advance(got.rollout, steps, last, {}, T0 + 9, _issuer())
    assert end.rollout.status == "finishing"
    assert any("handing the shadow run to group door" in line for line in end.lines)
    pubs = due(end.rollout, end.members, "edge")
    assert pubs == [
        Publication("edge/groups/door/shadow/colours", "group:door", "colours", 2, AT, None,
                    "shadow"),
        Publication("edge/a/shadow/colours", "device:a", kind="shadow_clear"),
        Publication("edge/b/shadow/colours", "device:b", kind="shadow_clear"),
    ]  # fmt: skip
    assert not any(p.topic.endswith("/desired/colours") for p in pubs)  # no release


@pytest.mark.parametrize(
    ("seen", "heard", "now", "trial", "reason"),
    [
        # disagrees over min_frames: halts
        (_seen(_run(value=0.2)), T0, T0 + 5, "failed", "disagrees: top1 0.2 over 10 frames"),
        # too few frames yet: pending
        (_seen(_run(frames=3)), T0, T0 + 5, "pending", "running: 3 of 8 frames compared"),
        # the run failed on the device
        (_seen(_run("failed", 0, None, error="cannot load")), T0, T0 + 5, "failed",
         "shadow run failed: cannot load"),
        # the candidate errs on too many frames
        (_seen(_run(errors=5, error="boom")), T0, T0 + 5, "failed", "candidate failed on 5 of 15"),
        # a shadow_failed event, or a refused instruction (desired_invalid on its topic)
        (_seen(None, "shadow run failed: cascade only"), T0, T0 + 5, "failed",
         "shadow run failed: cascade only"),
        # a report of another run (another issued_at) is not this one
        (_seen(_run(issued_at=AT - 50)), T0, T0 + 5, "pending", "waiting for the device"),
        # silent for timeout_s: failed
        (_seen(None), T0, T0 + 61, "failed", "said nothing about it for 60 s"),
        # the run moved on (news now): pending however long since sent
        (_seen(_run(frames=5)), T0, T0 + 70, "pending", "5 of 8 frames"),
        # still news, but pending max_device_s after it was sent: failed
        (_seen(_run(frames=6)), T0 + 90, T0 + 100, "failed", "not done 100 s after it was sent"),
        # runs the candidate already: passed
        (Observed(None, True, ("colours", 2)), T0, T0 + 5, "succeeded", "runs v2 already"),
    ],
)  # fmt: skip
def test_a_trial_is_judged_by_the_devices_shadow_run(
    seen: Observed, heard: float, now: float, trial: str, reason: str
) -> None:
    r, steps, members = _tried(max_device_s=100.0)
    members[0] = replace(members[0], trial_heard=heard, trial_seen=["running", 4, 0])
    got = advance(r, steps, members, {"a": seen}, now, _issuer())
    a = got.members[0]
    assert a.trial == trial and reason in (a.trial_reason or ""), a
    assert a.outcome is None or trial == "succeeded"
    if trial == "failed":
        assert got.rollout.status == "halting" and got.rollout.reason == "canary failed on a"
        assert a.take_back is None and a.issued_at is None  # no desired state to take back
        pubs = due(got.rollout, got.members, "edge")
        assert pubs == [Publication("edge/a/shadow/colours", "device:a", device="a",
                                    kind="shadow_clear")]  # fmt: skip
        cleared = [replace(a, trial_cleared=now + 1), got.members[1]]
        end = advance(got.rollout, got.steps, cleared, {}, now + 1, _issuer())
        assert end.rollout.status == "halted" and due(end.rollout, end.members, "edge") == []
        assert end.members[1].trial is None  # never sent an instruction
    else:
        assert got.rollout.status == "running"


def test_a_re_look_at_the_same_progress_is_not_news() -> None:
    r, steps, members = _tried()
    got = advance(r, steps, members, {"a": _seen(_run(frames=2))}, T0 + 20, _issuer())
    assert (got.members[0].trial_heard, got.members[0].trial_seen) == (T0 + 20, ["running", 2, 0])
    again = advance(r, steps, got.members, {"a": _seen(_run(frames=2))}, T0 + 50, _issuer())
    assert again.members[0].trial_heard == T0 + 20
    late = advance(r, steps, again.members, {"a": _seen(_run(frames=2))}, T0 + 81, _issuer())
    assert late.members[0].trial == "failed"  # 61 s since the run last moved


def test_a_failed_desired_state_after_a_passed_trial_takes_back_and_clears() -> None:
    r, steps, members = _tried()
    a = replace(members[0], trial="succeeded", issued_at=T0 + 1, sent=T0 + 2, outcome="pending",
                prior=("colours", 1), seen=[None, 0, None])  # fmt: skip
    seen = Observed(_applied(T0 + 1, "rolled_back"), True, ("colours", 1), [T0 + 5, 0, None])
    got = advance(r, steps, [a, members[1]], {"a": seen}, T0 + 5, _issuer())
    assert got.rollout.status == "halting" and got.members[0].take_back == "clear"
    pubs = due(got.rollout, got.members, "edge")
    assert [(p.topic, p.kind) for p in pubs] == [
        ("edge/a/desired/colours", "take_back"),
        ("edge/a/shadow/colours", "shadow_clear"),
    ]


def test_abort_during_trials_clears_the_instructions_only() -> None:
    r, steps, members = _tried(status="aborting", reason="aborted by ops")
    got = advance(r, steps, members, {}, T0 + 5, _issuer())
    assert got.rollout.status == "aborting" and got.members[0].take_back is None
    assert [p.kind for p in due(got.rollout, got.members, "edge")] == ["shadow_clear"]
    done = [replace(got.members[0], trial_cleared=T0 + 6), got.members[1]]
    assert advance(got.rollout, got.steps, done, {}, T0 + 7, _issuer()).rollout.status == "aborted"


def test_pause_keeps_judging_trials_but_sends_no_desired_state() -> None:
    r, steps, members = _tried(status="paused")
    got = advance(r, steps, members, {"a": _seen(_run())}, T0 + 5, _issuer())
    assert got.members[0].trial == "succeeded" and got.members[0].outcome is None
    assert due(got.rollout, got.members, "edge") == []
    resumed = advance(replace(got.rollout, status="running"), got.steps, got.members, {},
                      T0 + 6, _issuer())  # fmt: skip
    assert resumed.members[0].outcome == "pending"


def test_a_shadow_rollout_and_its_trials_survive_the_database(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        with engine.begin() as conn:
            rollout_id = rollstore.create(
                conn, who="ops", group="door", model="colours", version=2, canary_pct=50,
                step_pct=100, timeout_s=60, members=["a", "b"], now=T0,
                shadow=Shadow(AT, 100, 25, 8, 0.9),
            )  # fmt: skip
            loaded = rollstore.load(conn, rollout_id)
        assert loaded is not None
        r, steps, members = loaded
        assert r.shadow == Shadow(AT, 100, 25, 8, 0.9)
        got = advance(r, steps, members, {}, T0 + 1, _issuer())
        with engine.begin() as conn:
            rollstore.save(conn, got.rollout, got.steps, got.members, (r.status, members), T0 + 1)
            pub = due(got.rollout, got.members, "edge")[0]
            rollstore.mark_sent(conn, got.rollout, pub, None, "srv", T0 + 2)
            sent = rollstore.load(conn, rollout_id)
            assert sent is not None
            moved = [replace(m, trial_seen=["running", 3, 0], trial_reason="x" * 3000)
                     if m.trial else m for m in sent[2]]  # fmt: skip
            rollstore.save(conn, sent[0], sent[1], moved, (r.status, sent[2]), T0 + 3)
            reloaded = rollstore.load(conn, rollout_id)
        assert reloaded is not None
        tried = next(m for m in reloaded[2] if m.trial is not None)
        assert (tried.trial, tried.trial_sent, tried.trial_heard) == ("pending", T0 + 2, T0 + 2)
        assert tried.trial_seen == ["running", 3, 0] and len(tried.trial_reason or "") == 2000
        pub = Publication(pub.topic, pub.target, device=tried.device, kind="shadow_clear")
        with engine.begin() as conn:
            rollstore.mark_sent(conn, reloaded[0], pub, None, "srv", T0 + 4)
            again = rollstore.load(conn, rollout_id)
            assert conn.execute(sa.select(sa.func.count()).select_from(deploys)).scalar() == 0
        assert again is not None
        assert next(m for m in again[2] if m.trial is not None).trial_cleared == T0 + 4
    finally:
        engine.dispose()


def test_a_hostile_phase_is_bounded_before_it_is_stored() -> None:
    r, steps, members = _tried()
    got = advance(r, steps, members, {"a": _seen(_run("x" * 100_000))}, T0 + 5, _issuer())
    a = got.members[0]
    assert a.trial == "pending" and a.trial_seen == ["x" * 32, 10, 0]
