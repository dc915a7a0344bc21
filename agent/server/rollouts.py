"""Server-side rollouts as pure rules: the rows of a rollout and what its devices
reported go in, the new rows and the publications due come out. No I/O, no clock:
:mod:`agent.server.driver` reads the rows, calls :func:`advance` and :func:`due`,
persists and publishes; tests drive the rules by tables.

The same rollout as ``edge-fleet rollout`` (:mod:`agent.fleet.rollout`): the same
plan (:func:`agent.fleet.rollout.plan`), the same verdicts
(:func:`agent.fleet.deploy.verdict_of`, :func:`~agent.fleet.deploy.refusal`), the same
silence rule (:func:`~agent.fleet.deploy.after_silence`: timeouts judge a device's
silence, not the step's duration), the same take-back after a halt and the same end
(the group's desired state, then the per-device ones cleared).

Statuses (:data:`Status`): ``running`` issues steps; ``paused`` issues nothing new but
keeps judging the devices of the current step (a failure still halts); ``halting`` and
``aborting`` send the take-back publications, then become ``halted`` / ``aborted``;
``finishing`` sends the group's desired state and the clears, then ``succeeded``.
:data:`ACTIVE` statuses hold the group: a second rollout of it is refused.

Beyond the CLI: a device still pending ``max_device_s`` after its desired state was
sent fails (timed out: it is set back like a silent one), however much it reports
meanwhile. Every report about the update is news and keeps the silence rule quiet, so
without this a device stuck in a retry loop, or one that reports fake progress on
purpose, would hold its step and the group for ever (:data:`DEFAULT_MAX_DEVICE_S`).

A member's ``outcome`` is None until its step issues its desired state, then
``pending``, ``succeeded`` or ``failed`` (the verdict's status; ``reason`` its detail).
A shadow rollout (``Rollout.shadow``) runs each step's members on the candidate in the
shadow first, their ``trial`` (:mod:`agent.server.rollshadow`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, get_args

from agent.config import RegistryConfig, UpdateConfig
from agent.desired import desired_topic
from agent.fleet.deploy import Verdict, after_silence, news, verdict_of
from agent.fleet.rollout import step_name
from agent.server import rollshadow
from agent.server.rollshadow import Shadow

Status = Literal[
    "running", "paused", "halting", "aborting", "finishing", "succeeded", "halted", "aborted"
]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
ACTIVE: Final[tuple[Status, ...]] = ("running", "paused", "halting", "aborting", "finishing")
"""Statuses that hold the group (the partial unique index of migration 0003) and that
a driver takes the lease for."""
TERMINAL: Final[tuple[Status, ...]] = ("succeeded", "halted", "aborted")
StepStatus = Literal["waiting", "running", "succeeded", "failed"]
Running = tuple[str | None, int | None]


def agent_deadlines_s() -> float:
    """The longest one update takes on an agent with default settings, from the
    agent's own defaults: the download's overall deadline, one retry's wait, the
    validation and activation deadlines and the probation."""
    registry, update = RegistryConfig(), UpdateConfig()
    parts = (
        registry.deadline_s,
        update.retry_max_s,
        update.validate_timeout_s,
        update.activate_timeout_s,
        update.probation_s,
    )
    return float(sum(parts))


DEFAULT_MAX_DEVICE_S: Final[float] = 1.5 * agent_deadlines_s()
"""How long a device may stay pending after its desired state was sent, however much
progress it reports (``max_device_s``): half as much again as
:func:`agent_deadlines_s` (2370 s), so 3555 s. Silence is judged by ``timeout_s``;
this bounds a device that keeps reporting without ever finishing (a stuck or hostile
one would otherwise hold its step, and the group, for ever)."""


@dataclass(frozen=True)
class Rollout:
    """One ``rollouts`` row (the parts the rules use)."""

    id: str
    group: str
    model: str
    version: int
    status: Status
    step: int  # the current step's index
    steps: int  # how many steps
    timeout_s: float
    canary: bool  # the first step is a canary (names it "canary")
    reason: str | None = None
    final_issued_at: float | None = None
    max_device_s: float = DEFAULT_MAX_DEVICE_S  # pending this long after sent: failed
    shadow: Shadow | None = None  # a shadow rollout (agent.server.rollshadow)


@dataclass(frozen=True)
class Step:
    """One ``rollout_steps`` row."""

    step: int
    size: int
    status: StepStatus = "waiting"
    started: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class Member:
    """One ``rollout_devices`` row."""

    device: str
    step: int
    issued_at: float | None = None
    sent: float | None = None
    outcome: str | None = None  # None (not issued), pending, succeeded, failed
    reason: str | None = None
    last_heard: float | None = None
    prior: Running = (None, None)
    seconds: float | None = None
    timed_out: bool = False
    take_back: str | None = None  # clear | set_back
    take_back_at: float | None = None
    take_back_sent: float | None = None
    seen: list[Any] | None = None
    trial: str | None = None  # its shadow run: None, pending, succeeded, failed
    trial_reason: str | None = None
    trial_sent: float | None = None  # its shadow instruction acknowledged by the broker
    trial_heard: float | None = None
    trial_seen: list[Any] | None = None  # the run's progress at the last news
    trial_seconds: float | None = None  # from trial_sent to the trial's verdict
    trial_cleared: float | None = None  # its shadow instruction cleared


@dataclass(frozen=True)
class Observed:
    """What the database shows about one device now (the ingested rows)."""

    state: Mapping[str, Any] | None = None
    online: bool | None = None
    running: Running = (None, None)
    fingerprint: list[Any] = field(default_factory=list)  # see :func:`fingerprint`
    refusal: str | None = None  # an event refusing this desired state
    run: Mapping[str, Any] | None = None  # its latest report of its shadow run of the model
    trial_refusal: str | None = None  # an event refusing or failing the shadow instruction


NOTHING: Final = Observed()


@dataclass(frozen=True)
class Advanced:
    """The rows after one :func:`advance`, and a line per change (for the log)."""

    rollout: Rollout
    steps: list[Step]
    members: list[Member]
    lines: list[str]


@dataclass(frozen=True)
class Publication:
    """A retained message due: a desired state (``model`` set) or a clear (empty); kinds
    ``shadow`` / ``shadow_clear``: a shadow instruction or its clear."""

    topic: str
    target: str  # device:ID or group:NAME
    model: str | None = None
    version: int | None = None
    issued_at: float | None = None
    device: str | None = None  # the member it is for (None: the group's)
    kind: Literal["issue", "take_back", "final", "clear", "shadow", "shadow_clear"] = "issue"


def fingerprint(
    state: Mapping[str, Any] | None,
    state_seen: float | None,
    events: Sequence[Mapping[str, Any]],
    telemetry_ts: float | None,
    issued_at: float,
) -> list[Any]:
    """What changes whenever the device says something about the desired state issued
    at ``issued_at`` (:func:`agent.fleet.deploy.news`): its state row's time when the
    state is about it, how many of ``events`` are about it, the latest telemetry time
    while it is on probation with it. A changed fingerprint is news (the device is
    heard); the driver keeps the last one in ``rollout_devices.seen``.

    A status message moves ``state_seen`` too; while the state is about this update
    that counts as news, as a status from a device in the middle of it is.
    """
    about_state = news("state", state, state, issued_at) if state is not None else False
    count = sum(1 for e in events if news("events", e, state, issued_at))
    probation = news("telemetry", {}, state, issued_at)
    return [
        state_seen if about_state else None,
        count,
        telemetry_ts if probation else None,
    ]


def _judge(r: Rollout, m: Member, seen: Observed, now: float) -> Member:
    """The member after looking at what it reported (only a sent, pending one)."""
    assert m.issued_at is not None and m.sent is not None
    heard = m.last_heard if m.last_heard is not None else m.sent
    fp = m.seen
    if seen.fingerprint != m.seen:
        if m.seen is not None:  # the first look only records where it stands
            heard = max(heard, now)
        fp = list(seen.fingerprint)
    verdict = verdict_of(seen.state, seen.online, seen.running, r.model, r.version, m.issued_at)
    if verdict.status == "pending" and seen.refusal is not None:
        verdict = replace(verdict, status="failed", detail=seen.refusal)
    timed_out = False
    if verdict.status == "pending":
        late = after_silence(verdict, heard, now, r.timeout_s)
        timed_out = late is not verdict
        verdict = late
    if verdict.status == "pending" and now - m.sent >= r.max_device_s:
        # news keeps the silence rule quiet; this bounds the whole wait (module docstring)
        why = f"not done {r.max_device_s:g} s after it was sent (last: {verdict.detail})"
        verdict, timed_out = Verdict("failed", why), True
    done = verdict.status != "pending"
    return replace(
        m,
        outcome=verdict.status,
        reason=verdict.detail,
        last_heard=heard,
        seen=fp,
        timed_out=timed_out,
        seconds=round(now - m.sent, 1) if done else None,
    )


def _take_back(m: Member) -> Member:
    """After a halt or an abort (see :mod:`agent.fleet.rollout`): a device that fell
    silent or was still updating goes back to what it ran (when known); one that
    refused or rolled back has its per-device desired state cleared."""
    if m.take_back is not None or m.issued_at is None or m.outcome == "succeeded":
        return m
    still = m.timed_out or m.outcome == "pending"
    if still and m.prior[0] is not None and m.prior[1] is not None:
        return replace(m, take_back="set_back")
    return replace(m, take_back="clear")


def advance(
    r: Rollout,
    steps: Sequence[Step],
    members: Sequence[Member],
    observed: Mapping[str, Observed],
    now: float,
    issue: Callable[[], float],
) -> Advanced:
    """One look at a rollout: judge the sent, pending members of its current step
    from ``observed``, then move it on (module docstring). ``issue`` gives a new
    ``issued_at`` (:func:`agent.fleet.deploy.issue_time`); a publication is only chosen
    here, and sent by the caller after these rows are stored."""
    lines: list[str] = []
    steps = list(steps)
    if r.status in TERMINAL or not 0 <= r.step < len(steps):
        return Advanced(r, steps, list(members), lines)
    name = step_name(r.step, r.canary)
    out: list[Member] = []
    for m in members:
        if r.status in ("running", "paused") and m.outcome == "pending" and m.sent is not None:
            judged = _judge(r, m, observed.get(m.device, NOTHING), now)
            if (judged.outcome, judged.reason) != (m.outcome, m.reason):
                after = f" after {judged.seconds:g} s" if judged.seconds is not None else ""
                lines.append(f"  {m.device}: {judged.outcome} ({judged.reason}){after}")
            m = judged
        if r.status in ("running", "paused") and m.trial == "pending" and m.trial_sent is not None:
            tried = rollshadow.judge_trial(r, m, observed.get(m.device, NOTHING), now)
            if (tried.trial, tried.trial_reason) != (m.trial, m.trial_reason):
                after = f" after {tried.trial_seconds:g} s" if tried.trial_seconds else ""
                lines.append(f"  {m.device}: shadow {tried.trial} ({tried.trial_reason}){after}")
            m = tried
        out.append(m)
    current = [m for m in out if m.step == r.step]
    step = steps[r.step]
    over, failed = rollshadow.step_over(r, current)
    if r.status in ("running", "paused") and step.status == "running" and over and failed:
        steps[r.step] = replace(step, status="failed", finished=now)
        reason = f"{name} failed on {', '.join(failed)}"
        r = replace(r, status="halting", reason=reason)
        lines.append(f"halted: {reason}")
        out = [_take_back(m) if m.step == r.step else m for m in out]
    elif r.status in ("running", "paused") and step.status == "running" and over:
        steps[r.step] = replace(step, status="succeeded", finished=now)
        lines.append(f"{name}: succeeded")
    if r.status == "aborting":
        out = [_take_back(m) if m.step == r.step else m for m in out]
    out = with_take_back_times(out, issue)
    if (
        r.status in ("halting", "aborting")
        and not any(m.take_back is not None and m.take_back_sent is None for m in out)
        and not rollshadow.uncleared(out)
    ):
        # every take-back is sent (or there was none): the end
        r = replace(r, status="halted" if r.status == "halting" else "aborted")
        lines.append(f"rollout {r.status}: {r.reason}")
    if r.status == "running" and steps[r.step].status == "succeeded":
        if r.step + 1 < len(steps):
            r = replace(r, step=r.step + 1)
        else:
            r = replace(r, status="finishing", final_issued_at=issue())
            if r.shadow is not None and r.shadow.promote_at is None:
                lines.append(f"every step succeeded: handing the shadow run to group {r.group}")
            else:
                lines.append(f"every step succeeded: setting group {r.group}'s desired state")
    if r.status == "running" and steps[r.step].status == "waiting":
        devices = [m.device for m in out if m.step == r.step and m.outcome is None]
        if r.shadow is not None:
            out = [
                replace(m, trial="pending", trial_reason="not sent yet")
                if m.step == r.step and m.trial is None
                else m
                for m in out
            ]
        else:
            out = _issued(out, r.step, observed, issue)
        steps[r.step] = replace(steps[r.step], status="running", started=now)
        shadow = " (shadow first)" if r.shadow is not None else ""
        lines.append(f"{step_name(r.step, r.canary)}{shadow}: {', '.join(devices)}")
    elif r.status == "running" and steps[r.step].status == "running":
        current = [m for m in out if m.step == r.step]
        if rollshadow.trials_passed(r, current) and any(m.outcome is None for m in current):
            out = _issued(out, r.step, observed, issue)
            lines.append(f"{name}: shadow runs passed, desired states issued")
    return Advanced(r, steps, out, lines)


def _issued(
    members: Sequence[Member],
    step: int,
    observed: Mapping[str, Observed],
    issue: Callable[[], float],
) -> list[Member]:
    """``members`` with the desired states of ``step``'s unissued ones chosen."""
    return [
        replace(
            m,
            issued_at=issue(),
            outcome="pending",
            reason="not sent yet",
            prior=observed.get(m.device, NOTHING).running,
        )
        if m.step == step and m.outcome is None
        else m
        for m in members
    ]


def due(r: Rollout, members: Sequence[Member], prefix: str) -> list[Publication]:
    """The publications this rollout still owes, in order: desired states issued and
    not yet acknowledged, take-backs not yet sent, and when finishing the group's
    desired state followed by a clear of every member's (the broker delivers in order:
    a device has the group's state before its own is cleared). A shadow rollout's
    instructions and clears come with them (:mod:`agent.server.rollshadow`)."""
    out: list[Publication] = []
    shadow = r.shadow is not None
    if r.status in ("running", "paused"):
        for m in members:
            target = f"device:{m.device}"
            if m.outcome == "pending" and m.issued_at is not None and m.sent is None:
                desired = desired_topic(prefix, target, r.model)
                out.append(Publication(desired, target, r.model, r.version, m.issued_at, m.device))
            if shadow:  # an instruction, or its clear after the desired state
                out += rollshadow.running_due(r, m, prefix)
    elif r.status in ("halting", "aborting"):
        for m in members:
            if m.take_back is None or m.take_back_sent is not None:
                continue
            target = f"device:{m.device}"
            topic = desired_topic(prefix, target, r.model)
            model, version = m.prior
            if m.take_back == "set_back" and m.take_back_at is not None and model == r.model:
                at = m.take_back_at
                out.append(Publication(topic, target, model, version, at, m.device, "take_back"))
            else:
                out.append(Publication(topic, target, device=m.device, kind="take_back"))
        out += [
            rollshadow.clear(r, f"device:{m.device}", prefix, m.device)
            for m in rollshadow.uncleared(members)
        ]
    elif r.status == "finishing" and r.shadow is not None and r.shadow.promote_at is None:
        out += rollshadow.final_due(r, members, prefix)
    elif r.status == "finishing" and r.final_issued_at is not None:
        target = f"group:{r.group}"
        topic = desired_topic(prefix, target, r.model)
        out.append(Publication(topic, target, r.model, r.version, r.final_issued_at, kind="final"))
        for m in members:
            target = f"device:{m.device}"
            out.append(Publication(desired_topic(prefix, target, r.model), target, kind="clear"))
        if shadow:  # any instruction left (none unless a crash came between), the group's
            out += [rollshadow.clear(r, f"device:{m.device}", prefix, None)
                    for m in rollshadow.uncleared(members)]  # fmt: skip
            out.append(rollshadow.clear(r, f"group:{r.group}", prefix, None))
    return out


def with_take_back_times(members: Sequence[Member], issue: Callable[[], float]) -> list[Member]:
    """Members whose set-back has no ``issued_at`` yet get one (chosen and stored
    before it is published, like every desired state)."""
    return [
        replace(m, take_back_at=issue())
        if m.take_back == "set_back" and m.take_back_at is None
        else m
        for m in members
    ]
