"""Rollouts in the database: create one, read its rows into the plain values of
:mod:`agent.server.rollouts`, write them back, and read what its devices reported
(the ingested ``devices``, ``events`` and ``telemetry_raw`` rows). Each function takes
an open connection; the caller owns the transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, get_args

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from agent.fleet.deploy import serves
from agent.fleet.rollout import plan
from agent.server.rollobserve import EVENT_SKEW_S as EVENT_SKEW_S
from agent.server.rollobserve import MAX_EVENTS as MAX_EVENTS
from agent.server.rollobserve import observe as observe
from agent.server.rollouts import (
    ACTIVE,
    DEFAULT_MAX_DEVICE_S,
    STATUSES,
    Member,
    Publication,
    Rollout,
    Status,
    Step,
    StepStatus,
)
from agent.server.rollshadow import Shadow, shadow_of
from agent.server.schema import (
    deploys,
    device_groups,
    devices,
    rollout_devices,
    rollout_steps,
    rollouts,
)


class GroupBusy(Exception):
    """The group has an unfinished rollout (its id in ``args[0]``)."""


def json_doc(payload: bytes) -> dict[str, Any]:
    """A desired-state payload we made, as the document stored in ``deploys``."""
    doc = json.loads(payload)
    return doc if isinstance(doc, dict) else {}


def members_of(conn: sa.Connection, group: str, model: str | None = None) -> list[str]:
    """The devices whose last status names ``group`` (with ``model``: that may take a
    desired state of it, :func:`agent.fleet.deploy.serves`)."""
    rows = conn.execute(
        sa.select(device_groups.c.device, devices.c.state)
        .join(devices, devices.c.id == device_groups.c.device, isouter=True)
        .where(device_groups.c.group_name == group)
    )
    return sorted(
        row.device
        for row in rows
        if model is None or serves(row.state if isinstance(row.state, dict) else None, model)
    )


def active_in(conn: sa.Connection, group: str) -> str | None:
    """The id of the group's unfinished rollout, if any."""
    row = conn.execute(
        sa.select(rollouts.c.id).where(
            rollouts.c.group_name == group, rollouts.c.status.in_(ACTIVE)
        )
    ).first()
    return row.id if row is not None else None


def active_for_device(conn: sa.Connection, device: str) -> str | None:
    """The id of an unfinished rollout that has ``device`` among its members, if any
    (its per-device desired state is the rollout's to set and clear)."""
    row = conn.execute(
        sa.select(rollouts.c.id)
        .join(rollout_devices, rollout_devices.c.rollout_id == rollouts.c.id)
        .where(rollout_devices.c.device == device, rollouts.c.status.in_(ACTIVE))
    ).first()
    return row.id if row is not None else None


def create(
    conn: sa.Connection,
    *,
    who: str,
    group: str,
    model: str,
    version: int,
    canary_pct: float,
    step_pct: float,
    timeout_s: float,
    members: Sequence[str],
    now: float,
    max_device_s: float | None = None,
    shadow: Shadow | None = None,
) -> str:
    """Store a new running rollout over ``members`` (planned by
    :func:`agent.fleet.rollout.plan`); returns its id. Raises GroupBusy when the group
    has an unfinished rollout (checked here; the partial unique index refuses a
    concurrent one: sqlalchemy's IntegrityError), ConfigError for bad percentages.
    ``max_device_s`` defaults to the larger of ``timeout_s`` and
    :data:`~agent.server.rollouts.DEFAULT_MAX_DEVICE_S`. ``shadow``: a shadow rollout
    (its instructions' ``issued_at`` is stored here, before any is published)."""
    busy = active_in(conn, group)
    if busy is not None:
        raise GroupBusy(busy)
    steps = plan(members, group, canary_pct, step_pct)
    rollout_id = uuid.uuid4().hex[:16]
    if max_device_s is None:
        max_device_s = max(timeout_s, DEFAULT_MAX_DEVICE_S)
    options: dict[str, Any] = {
        "canary_pct": canary_pct,
        "step_pct": step_pct,
        "timeout_s": timeout_s,
        "max_device_s": max_device_s,
    }
    if shadow is not None:
        options["shadow"] = shadow.to_dict()
    conn.execute(
        rollouts.insert().values(
            id=rollout_id,
            created=now,
            updated=now,
            who=who,
            group_name=group,
            model=model,
            version=version,
            options=options,
            status="running",
            step=0,
        )
    )
    conn.execute(
        rollout_steps.insert(),
        [
            {"rollout_id": rollout_id, "step": i, "size": len(s), "status": "waiting"}
            for i, s in enumerate(steps)
        ],
    )
    conn.execute(
        rollout_devices.insert(),
        [
            {"rollout_id": rollout_id, "device": d, "step": i, "updated": now}
            for i, s in enumerate(steps)
            for d in s
        ],
    )
    return rollout_id


def load(conn: sa.Connection, rollout_id: str) -> tuple[Rollout, list[Step], list[Member]] | None:
    """The rollout's rows as plain values, or None when there is no such rollout."""
    row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).first()
    if row is None:
        return None
    steps = [
        Step(s.step, s.size, _step_status(s.status), s.started, s.finished)
        for s in conn.execute(
            sa.select(rollout_steps)
            .where(rollout_steps.c.rollout_id == rollout_id)
            .order_by(rollout_steps.c.step)
        )
    ]
    members = [
        Member(
            device=m.device,
            step=m.step,
            issued_at=m.issued_at,
            sent=m.sent,
            outcome=m.outcome,
            reason=m.reason,
            last_heard=m.last_heard,
            prior=(m.prior_model, m.prior_version),
            seconds=m.seconds,
            timed_out=bool(m.timed_out),
            take_back=m.take_back,
            take_back_at=m.take_back_at,
            take_back_sent=m.take_back_sent,
            seen=m.seen if isinstance(m.seen, list) else None,
            trial=m.trial,
            trial_reason=m.trial_reason,
            trial_sent=m.trial_sent,
            trial_heard=m.trial_heard,
            trial_seen=m.trial_seen if isinstance(m.trial_seen, list) else None,
            trial_seconds=m.trial_seconds,
            trial_cleared=m.trial_cleared,
        )
        for m in conn.execute(
            sa.select(rollout_devices)
            .where(rollout_devices.c.rollout_id == rollout_id)
            .order_by(rollout_devices.c.step, rollout_devices.c.device)
        )
    ]
    options = row.options if isinstance(row.options, dict) else {}
    rollout = Rollout(
        id=row.id,
        group=row.group_name,
        model=row.model,
        version=row.version,
        status=_status(row.status),
        step=row.step,
        steps=len(steps),
        timeout_s=float(options.get("timeout_s", 900.0)),
        canary=float(options.get("canary_pct", 0.0)) > 0,
        reason=row.reason,
        final_issued_at=row.final_issued_at,
        max_device_s=float(options.get("max_device_s", DEFAULT_MAX_DEVICE_S)),
        shadow=shadow_of(options),
    )
    return rollout, steps, members


def _status(value: str) -> Status:
    """A stored status; one this version does not know is treated as ended."""
    return next((known for known in STATUSES if known == value), "aborted")


def _step_status(value: str) -> StepStatus:
    steps: tuple[StepStatus, ...] = get_args(StepStatus)
    return next((known for known in steps if known == value), "waiting")


class Changed(Exception):
    """The rollout's status changed under the driver (an operator paused, resumed or
    aborted it): nothing was written; look again."""


def save(
    conn: sa.Connection,
    rollout: Rollout,
    steps: Sequence[Step],
    members: Sequence[Member],
    old: tuple[Status, Sequence[Member]],
    now: float,
) -> None:
    """Write back what changed: the rollout row, its steps, the members that differ
    from the ones read (``old``: the status and members read). Raises Changed, before
    anything else is written, when the stored status is no longer the one read."""
    old_status, old_members = old
    updated = conn.execute(
        rollouts.update()
        .where(rollouts.c.id == rollout.id, rollouts.c.status == old_status)
        .values(
            status=rollout.status,
            step=rollout.step,
            reason=rollout.reason,
            final_issued_at=rollout.final_issued_at,
            updated=now,
        )
    ).rowcount
    if updated != 1:
        raise Changed(rollout.id)
    for s in steps:
        conn.execute(
            rollout_steps.update()
            .where(rollout_steps.c.rollout_id == rollout.id, rollout_steps.c.step == s.step)
            .values(status=s.status, started=s.started, finished=s.finished)
        )
    before = {m.device: m for m in old_members}
    for m in members:
        if before.get(m.device) == m:
            continue
        conn.execute(
            rollout_devices.update()
            .where(rollout_devices.c.rollout_id == rollout.id, rollout_devices.c.device == m.device)
            .values(
                issued_at=m.issued_at,
                sent=m.sent,
                outcome=m.outcome,
                reason=m.reason[:2000] if m.reason else m.reason,
                last_heard=m.last_heard,
                prior_model=m.prior[0],
                prior_version=m.prior[1],
                seconds=m.seconds,
                timed_out=m.timed_out,
                take_back=m.take_back,
                take_back_at=m.take_back_at,
                take_back_sent=m.take_back_sent,
                seen=m.seen,
                trial=m.trial,
                trial_reason=m.trial_reason[:2000] if m.trial_reason else m.trial_reason,
                trial_sent=m.trial_sent,
                trial_heard=m.trial_heard,
                trial_seen=m.trial_seen,
                trial_seconds=m.trial_seconds,
                trial_cleared=m.trial_cleared,
                updated=now,
            )
        )


def set_status(conn: sa.Connection, rollout_id: str, status: Status, now: float) -> None:
    conn.execute(
        rollouts.update().where(rollouts.c.id == rollout_id).values(status=status, updated=now)
    )


def mark_sent(
    conn: sa.Connection,
    rollout: Rollout,
    pub: Publication,
    desired: dict[str, Any] | None,
    who: str,
    now: float,
) -> None:
    """Record that the broker acknowledged ``pub``; a desired state also becomes a
    ``deploys`` row (keyed by rollout, target and issued_at: stored once); a shadow
    instruction or its clear marks the member's trial."""
    values: dict[str, float] = {}
    if pub.device is not None:
        values = {
            "issue": {"sent": now, "last_heard": now},
            "take_back": {"take_back_sent": now},
            "shadow": {"trial_sent": now, "trial_heard": now},
            "shadow_clear": {"trial_cleared": now},
        }.get(pub.kind, {})
    if values:
        conn.execute(
            rollout_devices.update()
            .where(
                rollout_devices.c.rollout_id == rollout.id, rollout_devices.c.device == pub.device
            )
            .values(values)
        )
    if desired is None or pub.model is None or pub.version is None or pub.kind == "shadow":
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    kind, _, target = pub.target.partition(":")
    key = f"{pub.target}@{pub.issued_at!r}"
    conn.execute(
        insert(deploys)
        .values(
            id=f"{rollout.id}:{uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:24]}",
            created=now,
            who=who,
            target_kind=kind,
            target=target,
            model=pub.model,
            version=pub.version,
            desired=desired,
            rollout_id=rollout.id,
        )
        .on_conflict_do_nothing(index_elements=[deploys.c.id])
    )
