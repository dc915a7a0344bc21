"""The fleet as text: ``edge-fleet devices``' table (one row per device, one more per
other model it serves and per shadow run) and ``edge-fleet telemetry``'s one line per
report. Every cell is made printable and cut (:func:`agent.fleet.reports.printable`): what
devices send never reaches the terminal raw. The view of the reports is
:mod:`agent.fleet.view`."""

from __future__ import annotations

import datetime
import time
from typing import Any

from agent.fleet.reports import printable
from agent.fleet.view import FleetView, Report, number
from agent.strictjson import dumps

MAX_CELL = 64  # characters of one table cell


def age(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.3g}"
    return str(value)


def _update_cell(row: dict[str, Any]) -> str:
    phase, update = row["phase"], row["update"] or {}
    if phase in (None, "idle"):
        return "-"
    version = update.get("version")
    text = f"{phase} v{version}" if version is not None else phase
    if phase in ("failed", "rolled_back") and update.get("reason"):
        text += f": {update['reason']}"
    return text if len(text) <= 48 else text[:47] + "…"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; each cell printable and cut to MAX_CELL."""
    rows = [[printable(cell, MAX_CELL) for cell in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _shadow_cell(part: dict[str, Any]) -> str:
    """A model's shadow run in a few words: the candidate, its phase, its agreement."""
    shadow, run = part["shadow"] or {}, part["shadow_run"] or {}
    text = f"shadow v{shadow.get('version')}"
    if run.get("version") == shadow.get("version") and run.get("phase"):
        text += f" {run['phase']}"
        agreement = run.get("agreement")
        value = number(agreement.get("value")) if isinstance(agreement, dict) else None
        if value is not None:
            text += f" agreement {value:.3f}"
    return text


def devices_table(view: FleetView, now: float | None = None) -> str:
    """``edge-fleet devices``: one row per device."""
    headers = [
        "DEVICE",
        "ONLINE",
        "MODEL@VERSION",
        "BACKEND",
        "FPS",
        "P95_MS",
        "TEMP_C",
        "OUTBOX",
        "LAST_SEEN",
        "AGENT",
        "UPDATE",
    ]
    rows = []
    for device in view.reporting():
        row = device.row(now)
        online = {True: "yes", False: "no", None: "?"}[row["online"]]
        release = f"{row['model']}@{row['version']}" if row["model"] and row["version"] else "-"
        rows.append(
            [
                row["device"],
                online,
                release,
                _fmt(row["backend"]),
                _fmt(row["fps"]),
                _fmt(row["p95_ms"]),
                _fmt(row["temp_c"]),
                _fmt(int(row["outbox"]) if row["outbox"] is not None else None),
                age(row["last_seen"], now),
                _fmt(row["agent_version"]),
                _update_cell(row),
            ]
        )
        # a device serving several models: one more row per other model (issue 20)
        for model, part in row["models"].items():
            if model == row["model"]:
                continue
            cell = {"phase": part["phase"], "update": part["update"]}
            release = f"{model}@{part['version']}" if part["version"] else f"{model}@-"
            blank = ["-"] * 6
            rows.append(["", "", release, _fmt(part["backend"]), *blank, _update_cell(cell)])
        shadowing = [f"{m}: {_shadow_cell(p)}" for m, p in row["models"].items() if p["shadow"]]
        for line in shadowing:
            rows.append(["", "", "", "", *["-"] * 6, line])
    if not rows:
        return "no device has reported under this prefix"
    return table(headers, rows)


def _clock(ts: Any) -> str:
    value = number(ts)
    try:
        moment = datetime.datetime.fromtimestamp(time.time() if value is None else value)
    except (ValueError, OverflowError, OSError):  # a time out of range
        moment = datetime.datetime.now()
    return moment.strftime("%H:%M:%S")


def _part(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def describe(report: Report) -> str:
    """One line for ``edge-fleet telemetry``: time, device, stream, the gist."""
    doc = report.doc or {}
    stream = report.stream
    if stream == "telemetry":
        inference = _part(doc, "inference")
        outbox = _part(doc, "outbox")
        parts = [
            f"fps={_fmt(number(inference.get('fps')))}",
            f"p95={_fmt(number(inference.get('latency_ms_p95')))}ms",
            f"cpu={_fmt(number(doc.get('cpu_pct')), 0)}%",
            f"temp={_fmt(number(doc.get('temp_c')))}C",
            f"rss={_fmt(number(doc.get('rss_mb')), 0)}MB",
            f"outbox={outbox.get('depth', '-')}",
        ]
        if inference.get("version") is not None:
            parts.insert(0, f"v{inference.get('version')}/{inference.get('backend')}")
        gist = " ".join(parts)
    elif stream == "results":
        found = doc.get("classes") if "classes" in doc else doc.get("detections")
        if isinstance(found, list):  # none found: "nothing", not values=None
            items = [f"{f.get('label')} {f.get('score')}" for f in found if isinstance(f, dict)]
            gist = f"v{doc.get('version')} " + (", ".join(items) or "nothing")
        else:
            gist = f"v{doc.get('version')} values={doc.get('values')}"
        if isinstance(doc.get("pipeline"), str):  # several pipelines: which one
            gist = f"{printable(doc['pipeline'], 32)}: {gist}"
    elif stream == "events":
        skip = {"schema", "ts", "seq", "id", "event"}
        extra = " ".join(f"{k}={v}" for k, v in doc.items() if k not in skip and v is not None)
        gist = f"{doc.get('event')} {extra}".rstrip()
    else:
        gist = dumps(doc, sort_keys=True)
    if len(gist) > 300:
        gist = gist[:299] + "…"
    return f"{_clock(doc.get('ts'))} {report.device} {stream:<9} {gist}"
