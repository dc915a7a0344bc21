"""The shadow side of a server rollout (``shadow`` in ``POST /api/v1/rollouts``), as
pure rules beside :mod:`agent.server.rollouts`: the same semantics as ``edge-fleet
rollout --shadow`` (:mod:`agent.fleet.rollout`, :class:`agent.fleet.rollout.ShadowSteps`).

Each step's members first get their own shadow instruction (target ``device:ID``, no
promotion rule of its own, one ``issued_at`` for the whole rollout, chosen and stored
when the rollout is created) and are judged by
:func:`agent.fleet.shadow_watch.shadow_verdict` — their member's *trial*. Silence is
judged as for a desired state: news is a report of this run that moved on (another
phase, more frames or errors), and ``max_device_s`` bounds the whole wait. A failed
trial halts the rollout: every instruction the rollout made is cleared, nothing else
is taken back. With ``promote_at`` a step whose trials all passed then issues its
members' desired states (clearing their instructions) and the end is a rollout's end
plus a clear of the group's shadow topic; without it a step succeeds on its trials and
the end is the group's instruction (the same document for ``group:G``), then each
member's cleared.

A member's ``trial`` is None (not a shadow rollout, or its step has not begun), then
``pending``, ``succeeded`` or ``failed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from agent.desired import shadow_topic
from agent.fleet.deploy import Verdict, after_silence, same_instant
from agent.fleet.drift import shadow_figures
from agent.fleet.shadow import DEFAULT_MAX_CPU_PCT, DEFAULT_MIN_FRAMES, DEFAULT_SAMPLE_PCT
from agent.fleet.shadow_watch import shadow_verdict

if TYPE_CHECKING:
    from agent.server.rollouts import Member, Observed, Publication, Rollout


@dataclass(frozen=True)
class Shadow:
    """A rollout's shadow options (``rollouts.options["shadow"]``)."""

    issued_at: float  # of every instruction the rollout makes
    sample_pct: int = DEFAULT_SAMPLE_PCT
    max_cpu_pct: int = DEFAULT_MAX_CPU_PCT
    min_frames: int = DEFAULT_MIN_FRAMES
    promote_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_pct": self.sample_pct,
            "max_cpu_pct": self.max_cpu_pct,
            "min_frames": self.min_frames,
            "promote_at": self.promote_at,
            "issued_at": self.issued_at,
        }


def shadow_of(options: Mapping[str, Any] | None) -> Shadow | None:
    """The stored shadow options (None: not a shadow rollout, or unreadable)."""
    doc = (options or {}).get("shadow")
    if not isinstance(doc, Mapping):
        return None
    try:
        promote = doc.get("promote_at")
        return Shadow(
            issued_at=float(doc["issued_at"]),
            sample_pct=int(doc.get("sample_pct", DEFAULT_SAMPLE_PCT)),
            max_cpu_pct=int(doc.get("max_cpu_pct", DEFAULT_MAX_CPU_PCT)),
            min_frames=int(doc.get("min_frames", DEFAULT_MIN_FRAMES)),
            promote_at=None if promote is None else float(promote),
        )
    except (KeyError, TypeError, ValueError):
        return None


def progress(run: Mapping[str, Any] | None) -> list[Any]:
    """What moves while a shadow run goes on: its phase, frames and errors."""
    figures = shadow_figures(run) or {}
    phase = figures.get("phase")  # a device's string: bounded before it is stored
    return [phase[:32] if phase else phase, figures.get("frames"), figures.get("errors")]


def about(run: Mapping[str, Any] | None, issued_at: float) -> bool:
    """Whether ``run`` is the device's run of the instruction issued at ``issued_at``."""
    return isinstance(run, Mapping) and same_instant(run.get("issued_at"), issued_at)


def judge_trial(r: Rollout, m: Member, seen: Observed, now: float) -> Member:
    """The member after looking at its shadow run (only a sent, pending trial)."""
    sh = r.shadow
    assert sh is not None and m.trial_sent is not None
    heard = m.trial_heard if m.trial_heard is not None else m.trial_sent
    fp = m.trial_seen
    if about(seen.run, sh.issued_at):
        moved = progress(seen.run)
        if moved != m.trial_seen:  # a run that moved on is news (its first report too)
            heard, fp = max(heard, now), moved
    verdict = shadow_verdict(
        seen.run,
        seen.running,
        seen.online,
        model=r.model,
        version=r.version,
        issued_at=sh.issued_at,
        min_frames=sh.min_frames,
        promote_at=sh.promote_at,
    )
    if verdict.status == "pending" and seen.trial_refusal is not None:
        verdict = Verdict("failed", seen.trial_refusal)
    verdict = after_silence(verdict, heard, now, r.timeout_s)
    if verdict.status == "pending" and now - m.trial_sent >= r.max_device_s:
        verdict = Verdict(
            "failed", f"not done {r.max_device_s:g} s after it was sent (last: {verdict.detail})"
        )
    done = verdict.status != "pending"
    return replace(
        m,
        trial=verdict.status,
        trial_reason=verdict.detail,
        trial_heard=heard,
        trial_seen=fp,
        trial_seconds=round(now - m.trial_sent, 1) if done else None,
    )


def step_over(r: Rollout, current: Sequence[Member]) -> tuple[bool, list[str]]:
    """Whether the current step is over, and its failed devices (a failed trial ends
    the step; without ``promote_at`` the trials are the step)."""
    desired_over = not any(m.outcome in (None, "pending") for m in current)
    failed = [m.device for m in current if m.outcome == "failed" or m.trial == "failed"]
    if r.shadow is None:
        return desired_over, failed
    if any(m.trial in (None, "pending") for m in current):
        return False, failed
    tried = [m.device for m in current if m.trial == "failed"]
    if tried or r.shadow.promote_at is None:
        return True, tried
    return desired_over, failed


def trials_passed(r: Rollout, current: Sequence[Member]) -> bool:
    """With ``promote_at``: every trial of the step passed (its desired states are due)."""
    return (
        r.shadow is not None
        and r.shadow.promote_at is not None
        and bool(current)
        and all(m.trial == "succeeded" for m in current)
    )


def uncleared(members: Sequence[Member]) -> list[Member]:
    """Members whose instruction may be retained (chosen, maybe sent, not cleared)."""
    return [m for m in members if m.trial is not None and m.trial_cleared is None]


def instruction(r: Rollout, target: str, prefix: str, device: str | None) -> Publication:
    from agent.server.rollouts import Publication

    assert r.shadow is not None
    topic = shadow_topic(prefix, target, r.model)
    return Publication(topic, target, r.model, r.version, r.shadow.issued_at, device, "shadow")


def clear(r: Rollout, target: str, prefix: str, device: str | None) -> Publication:
    from agent.server.rollouts import Publication

    topic = shadow_topic(prefix, target, r.model)
    return Publication(topic, target, device=device, kind="shadow_clear")


def running_due(r: Rollout, m: Member, prefix: str) -> list[Publication]:
    """A running step's shadow publications for ``m``: its instruction not yet sent;
    once its desired state is chosen (after the desired state itself), its clear."""
    target = f"device:{m.device}"
    if m.trial == "pending" and m.trial_sent is None:
        return [instruction(r, target, prefix, m.device)]
    if m.issued_at is not None and m.trial is not None and m.trial_cleared is None:
        return [clear(r, target, prefix, m.device)]
    return []


def final_due(r: Rollout, members: Sequence[Member], prefix: str) -> list[Publication]:
    """The end of a shadow rollout without ``promote_at``: the group's instruction,
    then each member's cleared (the broker delivers in order)."""
    group = f"group:{r.group}"
    out = [instruction(r, group, prefix, None)]
    return out + [clear(r, f"device:{m.device}", prefix, None) for m in members]
