"""Staged rollouts: a release to a group, a few devices at a time, halting at the first
failure.

The group's members are the devices whose status names the group (online or not). They
are put in a fixed order (by SHA-256 of ``group/device``, so the same devices are the
canaries of every rollout in a group, and adding a device does not reshuffle the others)
and cut into steps: the canary (``--canary`` percent, at least one device), then
``--step`` percent at a time. Each step sets the desired state of its devices
(``<prefix>/<device>/desired/<model>``: each model has its own) and waits until every
one of them has a terminal state. ``--timeout`` judges silence, not duration: a device
that says nothing about the release for ``--timeout`` seconds counts as failed, so a
rollout never stalls on a silent device, while one that keeps reporting progress (its
phases, download progress, telemetry while on probation) is waited for, however long its
probation or download (see :func:`agent.fleet.deploy.news`; the device's own deadlines
bound every phase). Any failure halts the rollout: the devices not reached yet are left
as they were, and the ones that took the release keep it. A device that refused the
release or rolled it back runs what it ran before: its per-device desired state is
cleared. A device that fell silent may still be updating (a stalled download, or it
comes back online later): its per-device desired state is set back to the release it ran
before the step, so it returns there instead of finishing the update unwatched.

When every member runs the release, the group's desired state is set (so devices that
join the group later get it too) and the per-device desired states the rollout made
are cleared, so a later ``deploy --group`` reaches every member again.

A shadow rollout (``rollout --shadow``, :class:`ShadowSteps`) runs each step's devices
on the candidate in the shadow first: the step sends them a shadow instruction (one
``issued_at`` for the whole rollout, never a promotion rule of its own) and waits until
each one's shadow run has compared ``min_frames`` frames cleanly, agreeing at least
``promote_at`` when that is given (:mod:`agent.fleet.shadow_watch`). A failed shadow
run, a candidate that errs or disagrees halts the rollout, and the shadow runs it
started stop (their instructions cleared; each device's figures stay in its state).
With ``promote_at``, the devices of a step that passed are then sent the release as
above (their shadow instructions cleared) and the rollout ends as above; without it,
every member runs the candidate in the shadow at the end, and the group's shadow
instruction is set (the same document for the group: the devices' runs go on, their
figures are kept) and the per-device ones are cleared, for ``edge-fleet promote``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.desired import desired_topic, shadow_topic
from agent.errors import ConfigError
from agent.fleet.broker import BrokerError, FleetBroker
from agent.fleet.deploy import (
    Watched,
    desired_payload,
    issue_time,
    model_state,
    running_of,
    serves,
    watch,
)
from agent.fleet.shadow import shadow_payload
from agent.fleet.shadow_watch import ShadowRules
from agent.fleet.view import FleetView

Say = Callable[[str], None]


def plan(members: Sequence[str], group: str, canary_pct: float, step_pct: float) -> list[list[str]]:
    """The steps of a rollout over ``members``: canary first, then equal steps.

    Raises ConfigError for percentages outside 0..100 (canary) or (0, 100] (step).
    """
    if not 0 <= canary_pct <= 100:
        raise ConfigError([f"--canary: {canary_pct:g} is not a percentage from 0 to 100"])
    if not 0 < step_pct <= 100:
        raise ConfigError([f"--step: {step_pct:g} is not a percentage above 0, at most 100"])
    order = sorted(set(members), key=lambda d: hashlib.sha256(f"{group}/{d}".encode()).hexdigest())
    n = len(order)

    def count(pct: float) -> int:
        return max(1, math.ceil(n * pct / 100 - 1e-9))

    steps: list[list[str]] = []
    done = 0
    if canary_pct > 0 and n:
        done = count(canary_pct)
        steps.append(order[:done])
    size = count(step_pct)
    while done < n:
        steps.append(order[done : done + size])
        done += size
    return steps


@dataclass(frozen=True)
class ShadowSteps:
    """``rollout --shadow``: each step runs the candidate in the shadow first."""

    sample_pct: int
    max_cpu_pct: int
    min_frames: int
    promote_at: float | None  # None: the rollout ends with the group's shadow run

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_pct": self.sample_pct,
            "max_cpu_pct": self.max_cpu_pct,
            "min_frames": self.min_frames,
            "promote_at": self.promote_at,
        }


@dataclass
class Outcome:
    """How a rollout ended (``to_dict`` is what ``--json`` prints)."""

    model: str
    version: int
    group: str
    steps: list[list[Watched]] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    halted: str = ""  # why, when it halted
    shadow: ShadowSteps | None = None
    shadow_steps: list[list[Watched]] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return not self.halted

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "group": self.group,
            "outcome": "succeeded" if self.succeeded else "halted",
            "halted": self.halted or None,
            "steps": [[w.to_dict() for w in step] for step in self.steps],
            "untouched": self.untouched,
            "shadow": self.shadow.to_dict() if self.shadow else None,
            "shadow_steps": [[w.to_dict() for w in step] for step in self.shadow_steps],
        }

    @property
    def title(self) -> str:
        what = "rollout"
        if self.shadow is not None:
            what = "shadow rollout" if self.shadow.promote_at is None else "rollout (shadow first)"
        return f"{what} of {self.model} v{self.version} to group {self.group}"

    def summary(self) -> str:
        trials = [w for step in self.shadow_steps for w in step]
        devices = [w for step in self.steps for w in step]
        if self.shadow is not None and self.shadow.promote_at is None:
            devices = trials
        else:  # a device that failed its shadow run never got the release
            devices += [w for w in trials if w.verdict.status != "succeeded"]
        ok = [w.device for w in devices if w.verdict.status == "succeeded"]
        failed = [w for w in devices if w.verdict.status == "failed"]
        if self.succeeded:
            runs = "run it" if devices is not trials else f"run v{self.version} in the shadow"
            lines = [f"{self.title}: succeeded, {len(ok)} device(s) {runs}"]
            lines += [f"  {w.device}: {w.verdict.detail}" for w in trials]
            return "\n".join(lines)
        lines = [
            f"{self.title}: HALTED ({self.halted})",
            f"  succeeded: {', '.join(ok) or 'none'}",
        ]
        lines += [f"  failed: {w.device}: {w.verdict.detail}" for w in failed]
        lines += [
            f"  unknown: {w.device}: {w.verdict.detail}"
            for w in devices
            if w.verdict.status == "pending"
        ]
        lines.append(f"  untouched: {', '.join(self.untouched) or 'none'}")
        return "\n".join(lines)


def step_name(index: int, canary: bool) -> str:
    if canary and index == 0:
        return "canary"
    return f"step {index if canary else index + 1}"


def rollout(
    broker: FleetBroker,
    view: FleetView,
    *,
    model: str,
    version: int,
    group: str,
    canary_pct: float,
    step_pct: float,
    timeout_s: float,
    sign_key: Path | None,
    say: Callable[[str], None],
    shadow: ShadowSteps | None = None,
) -> Outcome:
    """Run a rollout (see the module's docstring; ``shadow``: a shadow rollout) on a
    connected ``broker`` whose retained reports are in ``view``.

    Raises BrokerError (no members, connection lost, a message refused), ConfigError
    (bad percentages) and VerificationError (the signing key cannot be loaded).
    """
    members = [d for d in view.members(group) if serves(view.devices[d].state, model)]
    others = sorted(set(view.members(group)) - set(members))
    if others:
        say(
            f"{len(others)} device(s) of group {group} do not serve {model} and are left "
            f"out: {', '.join(others[:10])}{' …' if len(others) > 10 else ''}"
        )
    if not members:
        raise BrokerError(
            f"no device reports group {group!r} under {view.prefix}/ and serves {model} "
            "(devices name their groups in their status and their models in their state; is "
            "device.groups set and the device connected once?)"
        )
    unknown = [d.id for d in view.reporting() if d.status is not None and "groups" not in d.status]
    if unknown:
        say(
            f"warning: {len(unknown)} device(s) do not say which groups they are in (an older "
            f"agent?): {', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}; those "
            f"in group {group} are not part of the steps and get v{version} only when the "
            "group's desired state is set at the end"
        )
    steps = plan(members, group, canary_pct, step_pct)
    outcome = Outcome(model, version, group, shadow=shadow)
    say(
        f"{outcome.title}: {len(members)} device(s) in "
        f"{len(steps)} step(s): " + " | ".join(", ".join(s) for s in steps)
    )
    trial = _Trial(broker, view, model, version, shadow, sign_key) if shadow else None
    for index, devices in enumerate(steps):
        name = step_name(index, canary_pct > 0)
        say(f"{name}: {', '.join(devices)}")
        ran = {d: running_of(model_state(view.devices[d].state, model)) for d in devices}
        watched: list[Watched] = []
        try:
            if trial is not None:
                tried: list[Watched] = []
                outcome.shadow_steps.append(tried)
                trial.run(devices, tried, timeout_s, say)
                failed = [w for w in tried if w.verdict.status != "succeeded"]
                if failed:
                    outcome.halted = f"{name} failed on {', '.join(w.device for w in failed)}"
                    outcome.untouched = [d for later in steps[index + 1 :] for d in later]
                    trial.stop(say)
                    return outcome
                if trial.shadow.promote_at is None:
                    continue
            outcome.steps.append(watched)
            for device in devices:
                issued_at = issue_time()
                topic = desired_topic(view.prefix, f"device:{device}", model)
                payload = desired_payload(model, version, f"device:{device}", issued_at, sign_key)
                broker.publish(topic, payload)
                watched.append(Watched(device, topic, issued_at))
                if trial is not None:
                    trial.release(device)
            watch(broker, view, watched, model, version, timeout_s, say)
        except BrokerError as exc:
            outcome.halted = f"{name} interrupted: {exc}"
            reached = {w.device for w in watched} | (trial.reached if trial else set())
            outcome.untouched = [d for d in devices if d not in reached]
            outcome.untouched += [d for later in steps[index + 1 :] for d in later]
            return outcome
        failed = [w for w in watched if w.verdict.status != "succeeded"]
        if failed:
            outcome.halted = f"{name} failed on {', '.join(w.device for w in failed)}"
            outcome.untouched = [d for later in steps[index + 1 :] for d in later]
            _take_back(broker, view, failed, ran, model, sign_key, say)
            if trial is not None:
                trial.stop(say)
            return outcome
    if trial is not None and trial.shadow.promote_at is None:
        trial.hand_to_group(group, members, say)
        return outcome
    issued_at = issue_time()
    topic = desired_topic(view.prefix, f"group:{group}", model)
    broker.publish(topic, desired_payload(model, version, f"group:{group}", issued_at, sign_key))
    # The broker delivers in order: each device has the group's state before its own is
    # cleared, so it never falls back on an older group state meanwhile.
    for device in members:
        broker.publish(desired_topic(view.prefix, f"device:{device}", model), b"")
    say(f"group {group} desired state set to v{version}; per-device desired states cleared")
    if trial is not None and model in view.group_shadows.get(group, {}):
        broker.publish(shadow_topic(view.prefix, f"group:{group}", model), b"")
        say(f"group {group} shadow instruction of {model} cleared")
    return outcome


class _Trial:
    """The shadow side of a shadow rollout: one instruction document per device, all
    issued at the rollout's start, and the devices whose instruction is still retained."""

    def __init__(
        self,
        broker: FleetBroker,
        view: FleetView,
        model: str,
        version: int,
        shadow: ShadowSteps,
        sign_key: Path | None,
    ) -> None:
        self.broker, self.view, self.model, self.version = broker, view, model, version
        self.shadow, self.sign_key = shadow, sign_key
        self.issued_at = issue_time()
        self.reached: set[str] = set()  # devices sent an instruction in the current step
        self.shadowing: list[str] = []  # devices whose instruction is retained

    def _payload(self, target: str) -> bytes:
        return shadow_payload(
            self.model,
            self.version,
            target,
            self.issued_at,
            sample_pct=self.shadow.sample_pct,
            max_cpu_pct=self.shadow.max_cpu_pct,
            promote=None,  # the rollout judges (and promotes), never the device by itself
            sign_key=self.sign_key,
        )

    def _topic(self, target: str) -> str:
        return shadow_topic(self.view.prefix, target, self.model)

    def run(self, devices: Sequence[str], tried: list[Watched], timeout_s: float, say: Say) -> None:
        """Send ``devices`` the instruction and wait for their runs' verdicts (appended
        to ``tried``). Raises BrokerError."""
        self.reached = set()
        for device in devices:
            topic = self._topic(f"device:{device}")
            self.broker.publish(topic, self._payload(f"device:{device}"))
            self.reached.add(device)
            self.shadowing.append(device)
            tried.append(Watched(device, topic, self.issued_at))
        rules = ShadowRules(
            self.model, self.version, self.shadow.min_frames, self.shadow.promote_at
        )
        watch(self.broker, self.view, tried, self.model, self.version, timeout_s, say, rules=rules)

    def release(self, device: str) -> None:
        """``device`` was sent the release: its shadow run ends."""
        self.broker.publish(self._topic(f"device:{device}"), b"")
        self.shadowing.remove(device)

    def stop(self, say: Say) -> None:
        """After a halt: the shadow runs the rollout started stop."""
        for device in self.shadowing:
            self.broker.publish(self._topic(f"device:{device}"), b"")
        if self.shadowing:
            say(f"shadow runs stopped on {', '.join(self.shadowing)} (their figures stay)")
        self.shadowing = []

    def hand_to_group(self, group: str, members: Sequence[str], say: Say) -> None:
        """Every member passed: the group's instruction is set (the same run: its devices
        go on), then the per-device ones are cleared (the broker delivers in order)."""
        self.broker.publish(self._topic(f"group:{group}"), self._payload(f"group:{group}"))
        for device in members:
            self.broker.publish(self._topic(f"device:{device}"), b"")
        self.shadowing = []
        say(
            f"group {group} shadow instruction set to v{self.version} "
            f"({self.shadow.sample_pct} % of frames); per-device instructions cleared; "
            f"edge-fleet promote --model {self.model} --group {group} makes it the release"
        )


def _take_back(
    broker: FleetBroker,
    view: FleetView,
    failed: Sequence[Watched],
    ran: dict[str, tuple[str | None, int | None]],
    model: str,
    sign_key: Path | None,
    say: Callable[[str], None],
) -> None:
    """After a halt: failed devices go back to what they ran (see the module docstring),
    on the model's own desired topic (so only a release of that model is set back)."""
    for w in failed:
        topic = desired_topic(view.prefix, f"device:{w.device}", model)
        ran_model, version = ran.get(w.device, (None, None))
        if w.timed_out and ran_model == model and version is not None:
            target = f"device:{w.device}"
            broker.publish(topic, desired_payload(model, version, target, issue_time(), sign_key))
            say(
                f"{w.device}: desired state set back to {model} v{version}, the release it "
                f"ran before (deploy --device {w.device} --clear to follow its groups again)"
            )
        else:
            broker.publish(topic, b"")
            say(f"{w.device}: per-device desired state cleared (it runs what it ran before)")
