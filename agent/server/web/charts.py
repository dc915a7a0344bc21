"""The device page's charts and update history.

Charts: fps, p95 latency, CPU, memory, temperature and outbox depth over the last hour,
day or week, read with the telemetry API's own rules and query
(:func:`queries.plan_series`, :func:`queries.series`) and drawn as inline SVG on the
server — a polyline of the averages over a band from the minima to the maxima, in a
fixed ``viewBox``, no ``style`` attribute (the pages' CSP forbids inline style).

History: the desired states published for the device or one of its groups (the
``deploys`` rows, :func:`agent.server.api.history.deploy_rows`) and its update events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from agent.server import queries
from agent.server.api.history import DeployFilter, deploy_rows
from agent.server.queries import Point
from agent.server.schema import events

Span = Literal["1h", "24h", "7d"]
SPANS: dict[Span, float] = {"1h": 3600.0, "24h": 86_400.0, "7d": 7 * 86_400.0}
DEFAULT_SPAN: Span = "1h"
WIDTH = 600.0  # the viewBox's width and height; the CSS scales the SVG
HEIGHT = 160.0
PAD = 4.0  # above the highest and below the lowest value
HISTORY_SHOWN = 20  # deploys and update events listed
MAX_GROUPS = 50  # of the device's groups whose deploys are listed
UPDATE_EVENTS = (
    "update_started",
    "update_succeeded",
    "update_failed",
    "rolled_back",
    "update_error",
    "desired_ignored",
    "desired_invalid",
)


@dataclass(frozen=True)
class Metric:
    name: str  # as stored (agent/contract.py's telemetry, nested names joined by ".")
    title: str
    unit: str
    digits: int = 1


METRICS = (
    Metric("inference.fps", "fps", ""),
    Metric("inference.latency_ms_p95", "p95 latency", "ms"),
    Metric("cpu_pct", "CPU", "%", 0),
    Metric("mem_pct", "memory", "%", 0),
    Metric("temp_c", "temperature", "°C"),
    Metric("outbox.depth", "outbox", "messages", 0),
)


def span(value: str | None) -> Span:
    """The span a query parameter names; the default for anything else."""
    for name in SPANS:
        if value == name:
            return name
    return DEFAULT_SPAN


# -- drawing: pure ------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    metric: Metric
    line: str  # polyline points "x,y x,y …" of the averages
    band: str  # polygon points: the maxima left to right, the minima back
    low: float | None  # the axis's ends (None: no points)
    high: float | None
    last: float | None  # the newest average
    points: int

    @property
    def id(self) -> str:
        return "chart-" + self.metric.name.replace(".", "-").replace("_", "-")


def draw(metric: Metric, points: Sequence[Point], since: float, until: float) -> Chart:
    """``points`` (oldest first) placed in a WIDTH × HEIGHT box: time left to right
    from ``since`` to ``until``, values bottom to top from the lowest minimum to the
    highest maximum (a flat series sits in the middle). Points that are not finite
    are left out."""
    kept = [p for p in points if all(math.isfinite(v) for v in (p.t, p.min, p.avg, p.max))]
    if not kept or until <= since:
        return Chart(metric, "", "", None, None, None, 0)
    low = min(p.min for p in kept)
    high = max(p.max for p in kept)
    if high == low:
        low, high = low - 1.0, high + 1.0
    scale = (HEIGHT - 2 * PAD) / (high - low)

    def x(t: float) -> float:
        return min(max((t - since) / (until - since), 0.0), 1.0) * WIDTH

    def y(v: float) -> float:
        return HEIGHT - PAD - (v - low) * scale

    line = " ".join(f"{x(p.t):.1f},{y(p.avg):.1f}" for p in kept)
    top = [f"{x(p.t):.1f},{y(p.max):.1f}" for p in kept]
    bottom = [f"{x(p.t):.1f},{y(p.min):.1f}" for p in reversed(kept)]
    return Chart(metric, line, " ".join(top + bottom), low, high, kept[-1].avg, len(kept))


# -- what the device page shows ----------------------------------------------------------


def charts(
    conn: sa.Connection, device: str, chosen: Span, now: float, raw_days: float
) -> list[Chart]:
    """The six charts of ``device`` over the span ending ``now``: one query each."""
    since = max(0.0, now - SPANS[chosen])
    plan = queries.plan_series(since=since, until=now, step=None, now=now, raw_days=raw_days)
    return [draw(m, queries.series(conn, device, m.name, plan), since, now) for m in METRICS]


def history(
    conn: sa.Connection, device: str, groups: Sequence[str]
) -> tuple[list[dict[str, Any]], list[sa.RowMapping]]:
    """(the newest deploys for ``device`` or its ``groups``, its newest update events)."""
    where = DeployFilter(device=device, groups=tuple(groups[:MAX_GROUPS]))
    published = deploy_rows(conn, where, HISTORY_SHOWN)
    e = events.c
    updates = conn.execute(
        sa.select(events)
        .where(e.device == device, e.event.in_(UPDATE_EVENTS))
        .order_by(e.id.desc())
        .limit(HISTORY_SHOWN)
    )
    return published, [row._mapping for row in updates]
