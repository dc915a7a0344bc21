"""The writes the ingester makes: messages (idempotent on their id), devices, telemetry,
events, and pruning. Each function takes an open connection; the caller owns the
transaction (commit after a message is fully stored, then acknowledge it).

The rules (buckets, cut-offs, which fields are kept) are in ``retention.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from agent.server.bulk import Key, Telemetry, record_messages, store_telemetry
from agent.server.inbound import Inbound
from agent.server.retention import (
    MAX_UPDATE_ID,
    DeviceFields,
    cutoffs,
    model_name,
    numeric_samples,
    served_models,
    state_fields,
    status_fields,
    stored_time,
)
from agent.server.schema import (
    device_groups,
    device_models,
    devices,
    events,
    messages,
    telemetry_agg,
    telemetry_raw,
)

Insert = postgresql.Insert | sqlite.Insert


def _insert(conn: sa.Connection, table: sa.Table) -> Insert:
    """An INSERT with ON CONFLICT for this connection's engine (both speak it)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def upsert_device(
    conn: sa.Connection,
    device: str,
    now: float,
    *,
    status: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
) -> None:
    """Create or update ``device`` from its latest status and/or state document.

    ``first_seen`` is set once; ``last_seen`` moves to ``now`` and never back. Columns
    the documents do not give (or give with a wrong type) keep their stored value; a
    status document with ``groups`` rewrites the device's group rows, a state document
    its model rows (``device_models``: every model it serves).
    """
    fields = _merge(
        status_fields(status) if status is not None else DeviceFields(),
        state_fields(state) if state is not None else DeviceFields(),
    )
    given: dict[str, Any] = {
        "agent_version": fields.agent_version,
        "model": fields.model,
        "version": fields.version,
        "online": fields.online,
        "groups": fields.groups,
        "status": dict(status) if status is not None else None,
        "state": dict(state) if state is not None else None,
    }
    given = {k: v for k, v in given.items() if v is not None}
    stmt = _insert(conn, devices).values(
        id=device,
        first_seen=now,
        last_seen=now,
        **{"groups": [], "online": False, **given},
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[devices.c.id],
        set_={
            "last_seen": sa.case(
                (devices.c.last_seen > stmt.excluded.last_seen, devices.c.last_seen),
                else_=stmt.excluded.last_seen,
            ),
            **{k: stmt.excluded[k] for k in given},
        },
    )
    conn.execute(stmt)
    if fields.groups is not None:
        conn.execute(sa.delete(device_groups).where(device_groups.c.device == device))
        if fields.groups:
            conn.execute(
                sa.insert(device_groups),
                [{"device": device, "group_name": g} for g in fields.groups],
            )
    if state is not None:
        conn.execute(sa.delete(device_models).where(device_models.c.device == device))
        served = served_models(state)
        if served:
            conn.execute(
                sa.insert(device_models),
                [{"device": device, "model": m, "version": v} for m, v in served.items()],
            )


def _merge(a: DeviceFields, b: DeviceFields) -> DeviceFields:
    return DeviceFields(
        groups=a.groups if a.groups is not None else b.groups,
        agent_version=b.agent_version or a.agent_version,
        online=a.online if a.online is not None else b.online,
        model=b.model or a.model,
        version=b.version if b.version is not None else a.version,
    )


def insert_telemetry(
    conn: sa.Connection,
    device: str,
    ts: float,
    samples: Mapping[str, float],
    *,
    doc: Mapping[str, Any] | None = None,
) -> int:
    """Store one telemetry document's samples raw and fold them into the minute's
    aggregates; returns the number of samples stored.

    With ``doc`` (the whole document), it also becomes the device's latest telemetry
    (``devices.telemetry``) unless the row holds a newer one: a replayed outbox sends
    old telemetry after new. A device without a row yet (no status or state so far)
    gets no row from its telemetry.
    """
    store_telemetry(conn, [Telemetry(device, ts, samples, doc)])
    return len(samples)


def insert_event(conn: sa.Connection, device: str, ts: float, doc: Mapping[str, Any]) -> None:
    """Store one event document; ``model``, ``version`` and ``update_id`` as columns when
    they have the right type and fit (a model name, an id of at most 64 characters),
    everything else in ``fields``."""
    fields = {k: v for k, v in doc.items() if k not in ("schema", "seq", "id", "ts", "event")}
    model, version, update_id = doc.get("model"), doc.get("version"), doc.get("update_id")
    conn.execute(
        sa.insert(events).values(
            device=device,
            ts=ts,
            event=str(doc.get("event")),
            model=model_name(model),
            version=version if isinstance(version, int) and not isinstance(version, bool) else None,
            update_id=update_id
            if isinstance(update_id, str) and len(update_id) <= MAX_UPDATE_ID
            else None,
            fields=fields,
        )
    )


@dataclass(frozen=True)
class Pruned:
    """Rows removed by one ``prune``."""

    raw: int
    agg: int
    messages: int


def prune(conn: sa.Connection, now: float, raw_days: float, agg_days: float) -> Pruned:
    """Remove what is past retention at ``now``: raw samples and message ids older than
    ``raw_days``, aggregates whose minute began more than ``agg_days`` ago. Events,
    deploys, rollouts and audit are history and are kept."""
    cut = cutoffs(now, raw_days, agg_days)
    raw = conn.execute(sa.delete(telemetry_raw).where(telemetry_raw.c.ts < cut.raw)).rowcount
    agg = conn.execute(sa.delete(telemetry_agg).where(telemetry_agg.c.bucket < cut.agg)).rowcount
    msgs = conn.execute(sa.delete(messages).where(messages.c.received < cut.raw)).rowcount
    return Pruned(raw=raw, agg=agg, messages=msgs)


def store_batch(conn: sa.Connection, batch: Sequence[tuple[Inbound, float]]) -> list[bool]:
    """Store the messages of ``batch`` (each with the time it was received) in ``conn``'s
    transaction; per message True when stored, False for a duplicate.

    The keys first (:func:`~agent.server.bulk.record_messages`: a key recorded before,
    or twice in the batch, is a duplicate), then each new message's write in device
    order (a stable sort: one device's messages keep their order; instances sharing a
    database lock device rows in the same order), then the batch's telemetry together
    (:func:`~agent.server.bulk.store_telemetry`). A reply is kept as an event named
    ``reply``.
    """
    keys = [Key(m.key, m.device, m.stream, _seq(m.doc), m.ts, received) for m, received in batch]
    new = record_messages(conn, keys)
    results = [False] * len(batch)
    telemetry: list[Telemetry] = []
    for i in sorted(range(len(batch)), key=lambda i: batch[i][0].device):
        msg, received = batch[i]
        if msg.key not in new:
            continue
        new.discard(msg.key)  # a second copy in this batch is a duplicate
        results[i] = True
        ts = stored_time(msg.ts, received)
        if msg.stream == "status":
            upsert_device(conn, msg.device, received, status=msg.doc)
        elif msg.stream == "state":
            upsert_device(conn, msg.device, received, state=msg.doc)
        elif msg.stream == "telemetry":
            telemetry.append(Telemetry(msg.device, ts, numeric_samples(msg.doc), msg.doc))
        elif msg.stream == "events":
            insert_event(conn, msg.device, ts, msg.doc)
        else:
            insert_event(conn, msg.device, ts, {**msg.doc, "event": "reply"})
    store_telemetry(conn, telemetry)
    return results


def _seq(doc: Mapping[str, Any]) -> int | None:
    seq = doc.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
