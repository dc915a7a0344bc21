"""The overview's alerts: pure rules over a device's row and its recent aggregates.

A device is flagged when it has been offline longer than ``Thresholds.offline_s``, its
outbox grew by ``Thresholds.outbox_growth`` messages or more within the last
:data:`WINDOW_S`, its temperature (the machine's or the Edge TPU's) is
``Thresholds.temp_high_c`` or more, more than ``Thresholds.error_share`` of its frames
failed within the window, or it fell back to the CPU (an ``accelerator_fallback`` event
within :data:`FALLBACK_S`, no ``accelerator_recovered`` after it, and its backend now
``cpu``), or its Raspberry Pi firmware reports under-voltage or throttling now, or
under-voltage since boot (``throttled`` in its live telemetry; boards without
``get_throttled`` send none).

The thresholds are ``edge-fleet serve`` options (``--alert-*``, :class:`Thresholds`).
The figures come from three queries whatever the fleet's size: the devices (at most
:data:`MAX_SCAN`), the telemetry minute aggregates of the window grouped by device and
metric, and the accelerator events grouped by device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from agent.fleet.view import live_telemetry
from agent.server import queries
from agent.server.schema import devices, events, telemetry_agg

WINDOW_S = 900.0  # the recent aggregates the trends are read from
MIN_FRAMES = 100.0  # fewer frames in the window: too few to judge a share
FALLBACK_S = 86_400.0  # how far back an accelerator_fallback event counts
MAX_SCAN = 10_000  # devices judged per overview
MAX_SHOWN = 50  # alerts listed (all are counted)
METRICS = ("outbox.depth", "inference.frames", "inference.errors")

Kind = Literal["offline", "outbox", "temperature", "errors", "fallback", "power"]
KINDS: tuple[Kind, ...] = ("offline", "outbox", "temperature", "errors", "fallback", "power")
TITLES: dict[Kind, str] = {
    "offline": "offline",
    "outbox": "outbox growing",
    "temperature": "temperature high",
    "errors": "error rate up",
    "fallback": "fell back to CPU",
    "power": "under-voltage / throttled",
}
FLAG_WORDS = {  # the firmware's flags (agent.sysinfo.THROTTLE_BITS) as the page says them
    "under_voltage": "under-voltage",
    "freq_capped": "frequency capped",
    "throttled": "throttled",
    "soft_temp_limit": "soft temperature limit",
}


@dataclass(frozen=True)
class Thresholds:
    """When a device is flagged (``edge-fleet serve --alert-*``)."""

    offline_s: float = 600.0  # offline longer than this
    outbox_growth: float = 100.0  # messages more in the window's later half than its first
    temp_high_c: float = 80.0  # the machine's or the Edge TPU's temperature
    error_share: float = 0.05  # of the frames in the window


@dataclass(frozen=True)
class Recent:
    """A device's recent aggregates (None: nothing reported in the window)."""

    outbox_before: float | None = None  # mean depth, the window's first half
    outbox_after: float | None = None  # mean depth, its second half
    frames: float | None = None  # the frames counter's rise over the window
    errors: float | None = None  # the errors counter's rise over the window
    fallback_ts: float | None = None  # the latest accelerator_fallback event
    recovered_ts: float | None = None  # the latest accelerator_recovered event


@dataclass(frozen=True)
class Alert:
    device: str
    kind: Kind
    detail: str

    @property
    def title(self) -> str:
        return TITLES[self.kind]


def device_alerts(
    row: Mapping[str, Any], recent: Recent, now: float, limits: Thresholds = Thresholds()
) -> list[Alert]:
    """The alerts of one device: ``row`` as :func:`queries.device_rows` gives it."""
    device = str(row["id"])
    found: list[Alert] = []

    def alert(kind: Kind, detail: str) -> None:
        found.append(Alert(device, kind, detail))

    if not row["online"]:
        away = now - float(row["last_seen"])
        if away > limits.offline_s:
            alert("offline", f"offline for {_duration(away)}")
        return found  # the other figures are stale
    live = queries.live_figures(row, now)
    before, after = recent.outbox_before, recent.outbox_after
    if before is not None and after is not None and after - before >= limits.outbox_growth:
        alert("outbox", f"outbox {before:.0f} → {after:.0f} messages in {WINDOW_S / 60:.0f} min")
    fresh = fresh_telemetry(row, now)
    hottest = _hottest(live.get("temp_c"), fresh.get("tpu_temp_c"))
    if hottest is not None and hottest >= limits.temp_high_c:
        alert("temperature", f"{hottest:.1f} °C (alert at {limits.temp_high_c:g})")
    frames, errors = recent.frames, recent.errors
    if frames is not None and errors is not None and frames >= MIN_FRAMES:
        share = errors / frames
        if share > limits.error_share:
            minutes = f"{WINDOW_S / 60:.0f} min"
            alert("errors", f"{share:.0%} of {frames:.0f} frames failed in the last {minutes}")
    fell = recent.fallback_ts
    if (
        fell is not None
        and fell >= now - FALLBACK_S
        and (recent.recovered_ts is None or recent.recovered_ts < fell)
        and live.get("backend") == "cpu"
    ):
        alert("fallback", "the Edge TPU failed: inference runs on the CPU")
    if detail := _power(fresh.get("throttled")):
        alert("power", detail)
    return found


def _power(flags: Any) -> str | None:
    """What the firmware's flags say, when they call for an operator: anything set now,
    or an under-voltage since boot (a weak supply corrupts SD cards)."""
    if not isinstance(flags, dict):
        return None
    now = [f for f in flags.get("now") or () if isinstance(f, str)]
    since = [f for f in flags.get("since_boot") or () if isinstance(f, str)]
    if now:
        said = ", ".join(FLAG_WORDS.get(f, f) for f in now[:4])
        return f"{said} now" + (" (check the power supply)" if "under_voltage" in now else "")
    if "under_voltage" in since:
        return "under-voltage since boot (check the power supply)"
    return None


def _hottest(*values: Any) -> float | None:
    found = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(found) if found else None


def fresh_telemetry(row: Mapping[str, Any], now: float) -> Mapping[str, Any]:
    """The device's telemetry when it is live (as the live figures judge it), else {}."""
    return live_telemetry(bool(row["online"]), row["telemetry"], now)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


# -- the overview's alerts ----------------------------------------------------------------


@dataclass(frozen=True)
class Alerts:
    total: int  # every alert found
    counts: dict[Kind, int]  # by kind
    shown: list[Alert] = field(default_factory=list)  # the first MAX_SHOWN, by device

    @property
    def kinds(self) -> list[tuple[Kind, str, int]]:
        """(kind, title, count) of the kinds found, in :data:`KINDS` order."""
        return [(kind, TITLES[kind], n) for kind, n in self.counts.items() if n]


def summarise(found: Iterable[Alert]) -> Alerts:
    """The count by kind and the first :data:`MAX_SHOWN` alerts, in the order given."""
    counts: dict[Kind, int] = {kind: 0 for kind in KINDS}
    shown: list[Alert] = []
    total = 0
    for alert in found:
        total += 1
        counts[alert.kind] += 1
        if len(shown) < MAX_SHOWN:
            shown.append(alert)
    return Alerts(total, counts, shown)


def recent_figures(conn: sa.Connection, now: float) -> dict[str, Recent]:
    """Every device's :class:`Recent` figures: two grouped queries."""
    since, middle = now - WINDOW_S, now - WINDOW_S / 2
    a = telemetry_agg.c
    first = a.bucket < middle

    def mean(half: sa.ColumnElement[bool]) -> Any:
        total = sa.func.sum(sa.case((half, a["count"]), else_=0))
        return sa.func.sum(sa.case((half, a.sum), else_=0.0)) / sa.func.nullif(total, 0)

    rows = conn.execute(
        sa.select(
            a.device,
            a.metric,
            mean(first),
            mean(sa.not_(first)),
            sa.func.max(a.max) - sa.func.min(a.min),
        )
        .where(a.bucket >= since, a.metric.in_(METRICS))
        .group_by(a.device, a.metric)
    ).all()
    figures: dict[str, dict[str, Any]] = {}
    for device, metric, before, after, rise in rows:
        one = figures.setdefault(device, {})
        if metric == "outbox.depth":
            one["outbox_before"] = _float(before)
            one["outbox_after"] = _float(after)
        elif metric == "inference.frames":
            one["frames"] = _float(rise)
        else:
            one["errors"] = _float(rise)
    e = events.c
    accelerator = conn.execute(
        sa.select(e.device, e.event, sa.func.max(e.ts))
        .where(
            e.ts >= now - FALLBACK_S,
            e.event.in_(("accelerator_fallback", "accelerator_recovered")),
        )
        .group_by(e.device, e.event)
    ).all()
    for device, event, ts in accelerator:
        key = "fallback_ts" if event == "accelerator_fallback" else "recovered_ts"
        figures.setdefault(device, {})[key] = _float(ts)
    return {device: Recent(**one) for device, one in figures.items()}


def fleet_alerts(conn: sa.Connection, now: float, limits: Thresholds = Thresholds()) -> Alerts:
    """The alerts of the fleet's first :data:`MAX_SCAN` devices, by id."""
    recent = recent_figures(conn, now)
    d = devices.c
    rows = conn.execute(
        sa.select(d.id, d.online, d.last_seen, d.state, d.telemetry).order_by(d.id).limit(MAX_SCAN)
    )
    nothing = Recent()
    return summarise(
        alert
        for row in rows
        for alert in device_alerts(dict(row._mapping), recent.get(row.id, nothing), now, limits)
    )


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None
