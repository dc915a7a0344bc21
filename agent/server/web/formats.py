"""How the dashboard writes times and figures: pure functions, used as Jinja filters."""

from __future__ import annotations

import json
import math
import time
from typing import Any


def when(ts: Any) -> str:
    """Seconds since the epoch as ``YYYY-MM-DD HH:MM:SSZ`` (UTC); ``—`` for no time."""
    if not _finite(ts) or not 0 <= ts < 2**33:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def ago(ts: Any, now: float) -> str:
    """How long before ``now`` ``ts`` was: ``12 s ago``, ``5 min ago``, ``3 h ago``,
    ``2 d ago``; ``in the future`` past a minute of clock skew; ``—`` for no time."""
    if not _finite(ts):
        return "—"
    seconds = now - ts
    if seconds < -60:
        return "in the future"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def figure(value: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals; ``—`` for none (offline, stale, not reported)."""
    if not _finite(value):
        return "—"
    return f"{value:.{digits}f}"


def size(n: Any) -> str:
    """Bytes as the page writes them: ``812 B``, ``195.3 KiB``, ``4.2 MiB``; ``—``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "—"
    if n < 1024:
        return f"{n} B"
    value = n / 1024.0
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024.0
    return f"{value:.1f} GiB"


def preview(fields: Any, limit: int = 160) -> str:
    """An event's detail as one short line of JSON: at most 20 keys, long strings cut,
    nested objects and lists as ``{…}`` / ``[…]``, the whole cut at ``limit``. Its cost
    does not grow with the event (a device's reply may be 64 KiB)."""
    if not isinstance(fields, dict):
        return "—"
    shown: dict[str, Any] = {}
    for n, (key, value) in enumerate(fields.items()):
        if n == 20:
            shown["…"] = f"{len(fields) - 20} more"
            break
        if isinstance(value, str):
            value = value if len(value) <= 80 else value[:79] + "…"
        elif isinstance(value, dict):
            value = "{…}" if value else {}
        elif isinstance(value, list):
            value = "[…]" if value else []
        shown[str(key)[:40]] = value
    text = json.dumps(shown, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
