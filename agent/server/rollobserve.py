"""What the ingested rows (``devices``, ``events``, ``telemetry_raw``) say about a
rollout's members: :func:`observe` gives :mod:`agent.server.rollouts` its
:class:`~agent.server.rollouts.Observed` values. Takes an open connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from agent.desired import desired_topic, shadow_topic
from agent.fleet.deploy import model_state, refusal, running_of
from agent.fleet.drift import freshest_run
from agent.server.rollouts import Member, Observed, Rollout, fingerprint
from agent.server.schema import devices, events, telemetry_raw

EVENT_SKEW_S = 5.0  # events are stamped by the device's clock: this much before sending
MAX_EVENTS = 500  # events read per device and look (a hostile device sends many)


def observe(
    conn: sa.Connection,
    members: Sequence[Member],
    prefix: str,
    current: int,
    model: str,
    rollout: Rollout | None = None,
) -> dict[str, Observed]:
    """What the ingested rows say about each member that is waited for (sent and
    pending: its desired state, or with ``rollout`` a shadow rollout, its trial) or
    about to be issued (its step is ``current``: its running release), from its state
    about ``model`` (:func:`agent.fleet.deploy.model_state`: the state's
    ``models[model]`` when the device reports its models, else the top-level state)."""
    out: dict[str, Observed] = {}
    for m in members:
        waited = m.outcome == "pending" and m.sent is not None and m.issued_at is not None
        tried = m.trial == "pending" and m.trial_sent is not None
        if not waited and not tried and not (m.step == current and m.outcome is None):
            continue
        row = conn.execute(
            sa.select(devices.c.state, devices.c.online, devices.c.model, devices.c.version,
                      devices.c.last_seen, devices.c.telemetry).where(devices.c.id == m.device)
        ).first()  # fmt: skip
        if row is None:
            out[m.device] = Observed()
            continue
        whole = row.state if isinstance(row.state, dict) else None
        state = model_state(whole, model)
        running = running_of(state) if state is not None else (row.model, row.version)
        seen = Observed(state, row.online, running)
        if tried and m.trial_sent is not None and rollout is not None:
            seen = _trial(conn, seen, m, prefix, rollout, whole, row.telemetry)
        if not waited or m.issued_at is None or m.sent is None:
            out[m.device] = seen
            continue
        docs = _events_since(conn, m.device, m.sent - EVENT_SKEW_S)
        topic = desired_topic(prefix, f"device:{m.device}", model)
        why = next((w for d in docs if (w := refusal(d, topic, m.issued_at)) is not None), None)
        telemetry_ts = conn.execute(
            sa.select(sa.func.max(telemetry_raw.c.ts)).where(
                telemetry_raw.c.device == m.device, telemetry_raw.c.ts >= m.sent - EVENT_SKEW_S
            )
        ).scalar()
        out[m.device] = replace(
            seen,
            fingerprint=fingerprint(state, row.last_seen, docs, telemetry_ts, m.issued_at),
            refusal=why,
        )
    return out


def _run(doc: Any, model: str) -> Any:
    runs = doc.get("shadows") if isinstance(doc, Mapping) else None
    return runs.get(model) if isinstance(runs, Mapping) else None


def _trial(
    conn: sa.Connection,
    seen: Observed,
    m: Member,
    prefix: str,
    r: Rollout,
    state: Any,
    telemetry: Any,
) -> Observed:
    """``seen`` with the member's shadow run (the fresher of its state's and its
    telemetry's, :func:`agent.fleet.drift.freshest_run`) and an event refusing its
    instruction (``desired_invalid`` naming its topic) or failing the run
    (``shadow_failed`` of the model and version)."""
    assert m.trial_sent is not None
    run = freshest_run(_run(state, r.model), _run(telemetry, r.model))
    topic = shadow_topic(prefix, f"device:{m.device}", r.model)
    why = None
    for doc in _events_since(conn, m.device, m.trial_sent - EVENT_SKEW_S):
        if doc["event"] == "desired_invalid" and doc.get("topic") == topic:
            why = f"refused the shadow instruction: {doc.get('error')}"
        elif doc["event"] == "shadow_failed" and (doc.get("model"), doc.get("version")) == (
            r.model,
            r.version,
        ):
            why = f"shadow run failed: {doc.get('error')}"
        if why is not None:
            break
    return replace(seen, run=run if isinstance(run, Mapping) else None, trial_refusal=why)


def _events_since(conn: sa.Connection, device: str, since: float) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(events.c.event, events.c.update_id, events.c.fields)
        .where(events.c.device == device, events.c.ts >= since)
        .order_by(events.c.ts)
        .limit(MAX_EVENTS)
    )
    out = []
    for row in rows:
        fields = row.fields if isinstance(row.fields, dict) else {}
        out.append({**fields, "event": row.event, "update_id": row.update_id})
    return out
