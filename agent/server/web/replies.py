"""How the device page shows a ``logs`` or ``diagnostics`` reply: pure rules, no I/O.

A reply is what a device published (stored cleaned by the ingester: strings printable
and capped, the whole within :data:`agent.fleet.reports.MAX_BYTES`), so nothing in it
is trusted to have the shape docs/protocol.md promises: a value of the wrong type is
shown as ``—`` or as compact JSON, never raises. The templates escape every string
(Jinja autoescape); nothing here makes markup.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.diagnostics import LOGS_MAX
from agent.server.web import formats

MAX_LINES = LOGS_MAX  # the most a device sends; more are not shown
MAX_ROWS = 50  # rows of one definition list
MAX_CELL = 300  # characters of one shown value
MAX_CONFIG = 256 * 1024  # characters of the pretty config (the reply is at most that)

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class LogsView:
    """A ``logs`` reply: its lines as one text for a ``<pre>``, how many, cut or not."""

    text: str
    count: int
    truncated: bool


@dataclass(frozen=True)
class DiagnosticsView:
    """A ``diagnostics`` reply as definition lists and the config as pretty JSON."""

    versions: Pairs = field(default_factory=list)
    store: Pairs = field(default_factory=list)
    releases: Pairs = field(default_factory=list)
    inference: Pairs = field(default_factory=list)
    outbox: Pairs = field(default_factory=list)
    mqtt: Pairs = field(default_factory=list)
    config: str = ""


def cell(value: Any) -> str:
    """One value as a definition list shows it: ``—`` for none, numbers and strings as
    they are, anything else as compact JSON; cut to :data:`MAX_CELL` characters."""
    if value is None:
        text = "—"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = formats.figure(value, 2) if isinstance(value, float) else str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL] + "…"


def pairs(doc: Any) -> Pairs:
    """The keys and values of an object (in its order), at most :data:`MAX_ROWS`; none
    for anything but an object."""
    if not isinstance(doc, Mapping):
        return []
    return [(str(k)[:64], cell(v)) for k, v in list(doc.items())[:MAX_ROWS]]


def logs_view(result: Mapping[str, Any]) -> LogsView:
    """A ``logs`` result's lines (strings only, at most :data:`MAX_LINES`), one a line."""
    raw = result.get("lines")
    lines = [line for line in raw if isinstance(line, str)] if isinstance(raw, list) else []
    lines = lines[-MAX_LINES:]
    return LogsView("\n".join(lines), len(lines), result.get("truncated") is True)


def _release(release: Any) -> tuple[str, str]:
    if not isinstance(release, Mapping):
        return "?", cell(release)
    version = release.get("version")
    name = f"v{version}" if type(version) is int else "v?"
    if "error" in release:
        return name, cell(release.get("error"))
    files = release.get("files")
    count = len(files) if isinstance(files, list) else 0
    parts = [
        cell(release.get("task")),
        formats.size(release.get("bytes")),
        f"{count} file{'s' if count != 1 else ''}",
    ]
    if release.get("active") is True:
        parts.append("active")
    return name, ", ".join(parts)


def diagnostics_view(result: Mapping[str, Any]) -> DiagnosticsView:
    """A ``diagnostics`` result: versions, the store (and a row per release), the
    inference, outbox and MQTT figures, and the redacted config as indented JSON."""
    store = result.get("store")
    store = store if isinstance(store, Mapping) else {}
    releases = store.get("releases")
    rows = [_release(r) for r in releases[:MAX_ROWS]] if isinstance(releases, list) else []
    config = json.dumps(result.get("config"), indent=2, ensure_ascii=False, default=str)
    if len(config) > MAX_CONFIG:
        config = config[:MAX_CONFIG] + "\n…(cut)"
    return DiagnosticsView(
        versions=pairs(result.get("versions")),
        store=pairs({k: v for k, v in store.items() if k != "releases"}),
        releases=rows,
        inference=pairs(result.get("inference")),
        outbox=pairs(result.get("outbox")),
        mqtt=pairs(result.get("mqtt")),
        config=config,
    )


def shown(out: Mapping[str, Any]) -> dict[str, LogsView | DiagnosticsView]:
    """What the device page shows beside the one line for a command's answer (the
    route's 200 body): ``{"logs": …}`` or ``{"diagnostics": …}``, else nothing."""
    result = out.get("result")
    if not out.get("ok") or not isinstance(result, Mapping):
        return {}
    if out.get("command") == "logs":
        return {"logs": logs_view(result)}
    if out.get("command") == "diagnostics":
        return {"diagnostics": diagnostics_view(result)}
    return {}
