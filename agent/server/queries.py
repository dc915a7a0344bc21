"""What the read API asks the database: SQLAlchemy Core selects over ``schema.py``, and
the pure rules for their parameters (which telemetry table, which step, how many
points), tested by tables.

Every function here takes an open connection and returns plain values; the routes in
:mod:`agent.server.api.read` turn them into response models. Bounds are enforced by the
rules (:class:`QueryError`, a one-line reason the API answers with 422), never trusted
to the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from agent.config import MODEL_NAME_PATTERN
from agent.fleet.view import DeviceView
from agent.server.retention import BUCKET_S, DAY_S
from agent.server.schema import (
    device_groups,
    device_models,
    devices,
    events,
    telemetry_agg,
    telemetry_raw,
)

Source = Literal["raw", "agg"]
MAX_POINTS = 10_000  # in one telemetry answer
TARGET_POINTS = 300  # the default step aims at about this many
RAW_MIN_STEP_S = 10  # telemetry comes every 10 s: a finer step shows nothing more
AGG_MIN_STEP_S = int(BUCKET_S)
DEFAULT_RANGE_S = 3600.0
MAX_TIME = 2.0**33  # seconds since the epoch (year 2242): larger is a mistake
NICE_STEPS = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_METRICS = 500  # names listed for one device
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


class QueryError(ValueError):
    """A parameter the API refuses: the message says which and what to do (422)."""


# -- the telemetry series: pure rules -----------------------------------------------------


@dataclass(frozen=True)
class SeriesPlan:
    """How to answer one series request: from which table, over which range, which step."""

    source: Source
    since: float
    until: float
    step: int  # seconds; points start at multiples of it since the epoch

    @property
    def points(self) -> int:
        """The most points the answer can hold."""
        first = math.floor(self.since / self.step)
        last = math.ceil(self.until / self.step)
        return last - first


def default_step(range_s: float) -> int:
    """The step for a range when none is asked for: the smallest of :data:`NICE_STEPS`
    giving at most :data:`TARGET_POINTS` points, else whole days."""
    for step in NICE_STEPS:
        if range_s / step <= TARGET_POINTS:
            return step
    return int(math.ceil(range_s / TARGET_POINTS / DAY_S) * DAY_S)


def plan_series(
    *,
    since: float | None,
    until: float | None,
    step: int | None,
    now: float,
    raw_days: float,
) -> SeriesPlan:
    """The plan for a series from ``since`` to ``until`` (default: the last hour) by
    ``step`` seconds (default: from the range).

    Raw samples (``telemetry_raw``) when the whole range is within raw retention and
    the step is under a minute; else the minute aggregates, the step rounded up to
    whole minutes. Raises QueryError for times that are not finite or out of range,
    ``until`` not after ``since``, a step under 10 s, or more than :data:`MAX_POINTS`.
    """
    for name, value in (("since", since), ("until", until)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_TIME):
            raise QueryError(f"{name}: {value} is not a time (seconds since the epoch, >= 0)")
    if until is None:
        until = now if since is None or since < now else since + DEFAULT_RANGE_S
    if since is None:
        since = max(0.0, until - DEFAULT_RANGE_S)
    if until <= since:
        raise QueryError(f"until ({until:g}) must be after since ({since:g})")
    if step is not None and step < RAW_MIN_STEP_S:
        raise QueryError(f"step: {step} s is too fine; at least {RAW_MIN_STEP_S} s")
    chosen = step if step is not None else default_step(until - since)
    raw = since >= now - raw_days * DAY_S and chosen < AGG_MIN_STEP_S
    if not raw:
        chosen = math.ceil(chosen / AGG_MIN_STEP_S) * AGG_MIN_STEP_S
    plan = SeriesPlan("raw" if raw else "agg", since, until, chosen)
    if plan.points > MAX_POINTS:
        needed = math.ceil((until - since) / MAX_POINTS)
        raise QueryError(
            f"{plan.points} points of {chosen} s from {since:g} to {until:g}; at most "
            f"{MAX_POINTS}: ask for a step of at least {needed} s or a shorter range"
        )
    return plan


# -- the telemetry series: SQL -----------------------------------------------------------


@dataclass(frozen=True)
class Point:
    t: float  # the start of the step
    min: float
    avg: float
    max: float
    count: int


def _bucket(conn: sa.Connection, column: sa.ColumnElement[float], step: int) -> Any:
    """floor(column / step) * step on this engine (PostgreSQL rounds a cast to integer;
    SQLite truncates it, which is floor for the non-negative times allowed here)."""
    if conn.dialect.name == "postgresql":
        return sa.func.floor(column / step) * step
    return sa.cast(column / step, sa.BigInteger) * step


def series(conn: sa.Connection, device: str, metric: str, plan: SeriesPlan) -> list[Point]:
    """The points of ``metric`` of ``device`` by ``plan``, oldest first; steps without
    samples are left out."""
    if plan.source == "raw":
        t = _bucket(conn, telemetry_raw.c.ts, plan.step).label("t")
        query = sa.select(
            t,
            sa.func.min(telemetry_raw.c.value),
            sa.func.avg(telemetry_raw.c.value),
            sa.func.max(telemetry_raw.c.value),
            sa.func.count(),
        ).where(
            telemetry_raw.c.device == device,
            telemetry_raw.c.metric == metric,
            telemetry_raw.c.ts >= plan.since,
            telemetry_raw.c.ts < plan.until,
        )
    else:
        agg = telemetry_agg.c
        t = _bucket(conn, agg.bucket, plan.step).label("t")
        total = sa.func.sum(agg["count"])
        query = sa.select(
            t,
            sa.func.min(agg.min),
            sa.func.sum(agg.sum) / total,
            sa.func.max(agg.max),
            total,
        ).where(
            agg.device == device,
            agg.metric == metric,
            agg.bucket >= plan.since,
            agg.bucket < plan.until,
        )
    rows = conn.execute(query.group_by(t).order_by(t)).all()
    return [Point(float(r[0]), float(r[1]), float(r[2]), float(r[3]), int(r[4])) for r in rows]


def metrics(conn: sa.Connection, device: str) -> list[str]:
    """The metric names ``device`` has aggregates for (kept longest), sorted, at most
    :data:`MAX_METRICS`: one index seek per name, however many rows each has."""
    names: list[str] = []
    last = ""
    agg = telemetry_agg.c
    while len(names) < MAX_METRICS:
        name = conn.execute(
            sa.select(sa.func.min(agg.metric)).where(agg.device == device, agg.metric > last)
        ).scalar()
        if name is None:
            break
        names.append(name)
        last = name
    return names


# -- devices ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFilter:
    group: str | None = None
    model: str | None = None
    version: int | None = None
    online: bool | None = None


def _where(f: DeviceFilter) -> list[sa.ColumnElement[bool]]:
    clauses: list[sa.ColumnElement[bool]] = []
    if f.group is not None:
        members = sa.select(device_groups.c.device).where(device_groups.c.group_name == f.group)
        clauses.append(devices.c.id.in_(members))
    if f.model is not None:
        clauses.append(serves(f.model))
    if f.version is not None:
        clauses.append(devices.c.version == f.version)
    if f.online is not None:
        clauses.append(devices.c.online == f.online)
    return clauses


def serves(model: str) -> sa.ColumnElement[bool]:
    """A device serves ``model``: its active release (the ``model`` column) or, with
    several pipelines or a cascade, its state's ``models`` names it (a JSON path:
    ``JSON_EXTRACT`` on SQLite, ``#>`` on PostgreSQL; a scan of the state column, as
    cheap as the unindexed ``model`` column's). A name that is not a model name (the
    pattern of ``model.name``) is matched by the column only, never put in a path."""
    by_column = devices.c.model == model
    if MODEL_NAME.fullmatch(model) is None:
        return by_column
    return sa.or_(by_column, devices.c.state[("models", model)].as_string().is_not(None))


_LIST_COLUMNS = (
    devices.c.id,
    devices.c.groups,
    devices.c.agent_version,
    devices.c.model,
    devices.c.version,
    devices.c.first_seen,
    devices.c.last_seen,
    devices.c.online,
    devices.c.state,
    devices.c.telemetry,
    devices.c.telemetry_ts,
)


def device_rows(
    conn: sa.Connection, where: DeviceFilter, limit: int, offset: int
) -> tuple[int, list[sa.RowMapping]]:
    """(how many devices match, the page of them sorted by id) — one row each, the
    latest telemetry included (no per-device query)."""
    clauses = _where(where)
    total = conn.execute(sa.select(sa.func.count()).select_from(devices).where(*clauses)).scalar()
    rows = conn.execute(
        sa.select(*_LIST_COLUMNS).where(*clauses).order_by(devices.c.id).limit(limit).offset(offset)
    )
    return int(total or 0), [row._mapping for row in rows]


def device_row(conn: sa.Connection, device: str) -> sa.RowMapping | None:
    """One device with its last status, state and telemetry documents; None if unknown."""
    row = conn.execute(
        sa.select(*_LIST_COLUMNS, devices.c.status).where(devices.c.id == device)
    ).first()
    return row._mapping if row is not None else None


def live_figures(row: Mapping[str, Any], now: float) -> dict[str, Any]:
    """What ``edge-fleet devices`` shows of a device (:meth:`DeviceView.row`): backend,
    fps, p95, temperature, outbox depth, phase, update, last error — the live figures
    blank unless the device is online and its telemetry at most 5 minutes old."""
    view = DeviceView(
        row["id"],
        status={"state": "online" if row["online"] else "offline"},
        state=_mapping(row["state"]),
        telemetry=_mapping(row["telemetry"]),
    )
    return view.row(now)


def _mapping(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventFilter:
    device: str | None = None
    model: str | None = None
    version: int | None = None
    event: str | None = None
    since: float | None = None
    until: float | None = None
    before_id: int | None = None


def check_times(since: float | None, until: float | None) -> None:
    """Raises QueryError unless both are finite times and ``until`` is after ``since``."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_TIME):
            raise QueryError(f"{name}: {value} is not a time (seconds since the epoch, >= 0)")
    if since is not None and until is not None and until <= since:
        raise QueryError(f"until ({until:g}) must be after since ({since:g})")


def event_rows(conn: sa.Connection, where: EventFilter, limit: int) -> list[sa.RowMapping]:
    """At most ``limit`` events matching ``where``, newest (highest id) first."""
    c = events.c
    clauses: list[sa.ColumnElement[bool]] = []
    for column, value in (
        (c.device, where.device),
        (c.model, where.model),
        (c.version, where.version),
        (c.event, where.event),
    ):
        if value is not None:
            clauses.append(column == value)
    if where.since is not None:
        clauses.append(c.ts >= where.since)
    if where.until is not None:
        clauses.append(c.ts < where.until)
    if where.before_id is not None:
        clauses.append(c.id < where.before_id)
    rows = conn.execute(sa.select(events).where(*clauses).order_by(c.id.desc()).limit(limit))
    return [row._mapping for row in rows]


def known_models(conn: sa.Connection, limit: int) -> list[str]:
    """Model names the server knows from devices' state documents (every model a
    device serves: ``device_models``), sorted."""
    m = device_models.c
    rows = conn.execute(sa.select(m.model).distinct().order_by(m.model).limit(limit))
    return [r[0] for r in rows]


def models_by_online(*by: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """(model, *by, online, devices): every device once per model it serves
    (``device_models``; a device serving two counts under each), a device serving
    none under model NULL (an outer join)."""
    m, d = device_models.c, devices.c
    return (
        sa.select(m.model, *by, d.online, sa.func.count())
        .select_from(devices.outerjoin(device_models, m.device == d.id))
        .group_by(m.model, *by, d.online)
        .order_by(m.model, *by, d.online)
    )
