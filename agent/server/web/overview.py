"""What the dashboard's fleet overview shows, and the rules behind it.

Counts come from the database grouped (one query each: online/offline, by group, by
model, by version; by model and version count each model a device serves, from
``device_models``: a device serving two counts under each), so the overview costs the
same few queries for 10 or 10,000 devices; the device table is one page of
:data:`PER_PAGE` rows. Updates in progress are the devices whose state document names a
phase of an update under way (``downloading`` to ``probation``; not ``idle`` nor an
outcome such as ``succeeded``) (read from the ``state`` column, at most :data:`MAX_SCAN`
rows) and the unfinished rollouts.

The pure parts (pagination, the bars per version, which phase is an update under way)
are tested by tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.contract import UPDATE_PHASES
from agent.server import queries, served
from agent.server.rollouts import ACTIVE
from agent.server.schema import device_groups, device_models, devices, rollouts
from agent.server.web import alerts

PER_PAGE = 50
MAX_PAGE = 100_000
MAX_GROUPS = 200  # rows of the by-group and by-model tables
MAX_BARS = 50  # versions shown as bars
MAX_SCAN = 10_000  # devices' state documents read for updates in progress
MAX_UPDATING = 20  # updating devices listed (all are counted)
UNDER_WAY = frozenset(UPDATE_PHASES)  # idle and the outcomes (succeeded, …) are not


# -- pure rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pagination:
    page: int  # 1-based, within 1..pages
    pages: int  # at least 1
    offset: int

    @property
    def previous(self) -> int | None:
        return self.page - 1 if self.page > 1 else None

    @property
    def next(self) -> int | None:
        return self.page + 1 if self.page < self.pages else None


def paginate(total: int, page: int, per_page: int = PER_PAGE) -> Pagination:
    """Page ``page`` of ``total`` rows, ``per_page`` each; a page past the end is the
    last page (a table that shrank since the link was made)."""
    pages = max(1, math.ceil(total / per_page))
    page = min(max(1, page), pages)
    return Pagination(page, pages, (page - 1) * per_page)


@dataclass(frozen=True)
class Bar:
    label: str  # "colours v3", or "no model yet"
    count: int
    pct: float  # of all devices, 0..100

    @property
    def width(self) -> str:
        """The bar's CSS width: at least a sliver for a non-zero count."""
        return f"{max(self.pct, 0.5 if self.count else 0.0):.1f}%"


def version_bars(counts: Iterable[tuple[str | None, int | None, int]], total: int) -> list[Bar]:
    """One bar per (model, version) with its share of ``total``, most devices first
    (then by label), at most :data:`MAX_BARS`."""
    bars = [
        Bar(
            f"{model} v{version}" if model is not None else "no model yet",
            count,
            100.0 * count / total if total else 0.0,
        )
        for model, version, count in counts
    ]
    bars.sort(key=lambda bar: (-bar.count, bar.label))
    return bars[:MAX_BARS]


def updating(state: Any) -> bool:
    """Whether a state document says an update is under way: its phase is one of an
    update's (downloading … probation), not idle nor the outcome of a finished one."""
    if not isinstance(state, dict):
        return False
    phase = state.get("phase")
    return isinstance(phase, str) and phase in UNDER_WAY


# -- what the page shows ------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Devices of one group or one model, online and offline."""

    name: str
    online: int
    offline: int


@dataclass(frozen=True)
class Updating:
    device: str
    phase: str
    target: str  # "colours v4" or ""


@dataclass(frozen=True)
class Overview:
    total: int
    online: int
    groups: list[Split]
    models: list[Split]
    bars: list[Bar]
    updating_count: int
    updating: list[Updating]
    rollouts: list[Any]  # rows: id, group_name, model, version, status, step

    @property
    def offline(self) -> int:
        return self.total - self.online


def _splits(rows: Iterable[Any]) -> list[Split]:
    seen: dict[str, list[int]] = {}
    for name, online, count in rows:
        counts = seen.setdefault(name if name is not None else "(none)", [0, 0])
        counts[0 if online else 1] += int(count)
    return [Split(name, on, off) for name, (on, off) in sorted(seen.items())][:MAX_GROUPS]


def overview(conn: sa.Connection) -> Overview:
    """The overview's figures: a handful of grouped queries, whatever the fleet's size."""
    d = devices.c
    by_online = conn.execute(sa.select(d.online, sa.func.count()).group_by(d.online)).all()
    total = sum(int(n) for _, n in by_online)
    online = sum(int(n) for flag, n in by_online if flag)
    g = device_groups.c
    groups = conn.execute(
        sa.select(g.group_name, d.online, sa.func.count())
        .join(devices, d.id == g.device)
        .group_by(g.group_name, d.online)
        .order_by(g.group_name)
        .limit(2 * MAX_GROUPS)
    ).all()
    # every model a device serves: a device serving two counts under each
    models = conn.execute(queries.models_by_online().limit(2 * MAX_GROUPS)).all()
    m = device_models.c
    versions = conn.execute(
        sa.select(m.model, m.version, sa.func.count())
        .select_from(devices.outerjoin(device_models, m.device == d.id))
        .group_by(m.model, m.version)
    ).all()
    under_way: list[Updating] = []
    count = 0
    for row in conn.execute(
        sa.select(d.id, d.state).where(d.state.is_not(None)).order_by(d.id).limit(MAX_SCAN)
    ):
        if updating(row.state):
            count += 1
            if len(under_way) < MAX_UPDATING:
                under_way.append(_updating(row.id, row.state))
    r = rollouts.c
    active = conn.execute(
        sa.select(r.id, r.group_name, r.model, r.version, r.status, r.step)
        .where(r.status.in_(ACTIVE))
        .order_by(r.created.desc())
        .limit(MAX_UPDATING)
    ).all()
    return Overview(
        total=total,
        online=online,
        groups=_splits(groups),
        models=_splits(models),
        bars=version_bars(((m, v, int(n)) for m, v, n in versions), total),
        updating_count=count,
        updating=under_way,
        rollouts=[row._mapping for row in active],
    )


def _updating(device: str, state: dict[str, Any]) -> Updating:
    update = state.get("update")
    target = ""
    if isinstance(update, dict) and isinstance(update.get("model"), str):
        target = f"{update['model']} v{update.get('version')}"
    return Updating(device, str(state.get("phase")), target)


def device_page(
    conn: sa.Connection, total: int, page: int, now: float
) -> tuple[Pagination, list[Any]]:
    """Page ``page`` of the device table (``total`` devices), sorted by id, each row
    with its live figures."""
    where = paginate(total, page)
    _, rows = queries.device_rows(conn, queries.DeviceFilter(), PER_PAGE, where.offset)
    return where, [table_row(row, now) for row in rows]


def table_row(row: Any, now: float) -> dict[str, Any]:
    """A device as the dashboard shows it: its row and the live figures."""
    live = queries.live_figures(row, now)
    groups = row["groups"] if isinstance(row["groups"], list) else []
    return {
        **live,
        "id": row["id"],
        "groups": [g for g in groups if isinstance(g, str)],
        "online": bool(row["online"]),
        "agent_version": row["agent_version"],
        "last_seen": heard(row["last_seen"], row["telemetry_ts"], bool(row["online"]), now),
        "served": served.served(row["state"]),
    }


def health(telemetry: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """The Pi's own health from a device's live telemetry, as (label, text, bad) rows:
    CPU clock, Wi-Fi signal, addresses, the firmware's throttling flags (bad: a flag set
    now) — only those the device reports (a board without them sends none)."""
    rows: list[tuple[str, str, bool]] = []
    freq = telemetry.get("cpu_freq_mhz")
    if isinstance(freq, int | float) and not isinstance(freq, bool):
        rows.append(("CPU clock", f"{freq:.0f} MHz", False))
    rssi = telemetry.get("wifi_rssi_dbm")
    if isinstance(rssi, int | float) and not isinstance(rssi, bool):
        rows.append(("Wi-Fi", f"{rssi:.0f} dBm", False))
    addresses = telemetry.get("ip_addresses")
    if isinstance(addresses, list) and addresses:
        rows.append(("Addresses", ", ".join(str(a)[:45] for a in addresses[:8]), False))
    flags = telemetry.get("throttled")
    if isinstance(flags, dict):
        words = alerts.FLAG_WORDS
        now = [words.get(str(f), str(f)[:40]) for f in flags.get("now") or () if f]
        since = [words.get(str(f), str(f)[:40]) for f in flags.get("since_boot") or () if f]
        text = ", ".join(now) + " now" if now else "fine now"
        if since:
            text += f"; since boot: {', '.join(since)}"
        rows.append(("Power", text, bool(now)))
    return rows


def heard(last_seen: float, telemetry_ts: Any, online: bool, now: float) -> float:
    """When the device was last heard from: its row's ``last_seen`` (status and state
    messages, the server's clock) or, online, its newest telemetry (the device's clock,
    never later than ``now``) when that is later — telemetry comes every few seconds,
    a state message only when something changes."""
    if not online or not isinstance(telemetry_ts, int | float) or isinstance(telemetry_ts, bool):
        return last_seen
    if not math.isfinite(telemetry_ts):
        return last_seen
    return max(last_seen, min(float(telemetry_ts), now))
