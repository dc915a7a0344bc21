"""Pure rules of the server's storage: minute buckets, retention cut-offs, and the fields
the server keeps from a device's documents. No I/O; tested by tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DAY_S = 86_400.0
BUCKET_S = 60.0


def minute_bucket(ts: float) -> float:
    """The start of the 1-minute bucket holding ``ts`` (seconds since the epoch)."""
    return math.floor(ts / BUCKET_S) * BUCKET_S


@dataclass(frozen=True)
class Cutoffs:
    """Rows strictly older than these times are past retention."""

    raw: float  # telemetry_raw.ts, messages.received
    agg: float  # telemetry_agg.bucket (the minute's start)


def cutoffs(now: float, raw_days: float, agg_days: float) -> Cutoffs:
    """The retention cut-offs at ``now``. Raises ValueError for a negative period."""
    if raw_days < 0 or agg_days < 0:
        raise ValueError("retention periods must not be negative")
    return Cutoffs(raw=now - raw_days * DAY_S, agg=now - agg_days * DAY_S)


def numeric_samples(doc: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The telemetry document's finite numbers, nested keys joined by ``.``.

    ``{"cpu_pct": 3.5, "inference": {"fps": 9.8, "backend": "cpu"}, "temp_c": None}``
    gives ``{"cpu_pct": 3.5, "inference.fps": 9.8}``. Booleans, strings, nulls, lists,
    NaN and infinities are left out, and so is the envelope (``schema``, ``seq``,
    ``id``, ``ts``).
    """
    out: dict[str, float] = {}
    for key, value in doc.items():
        if not prefix and key in ENVELOPE:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_samples(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                out[name] = number
    return out


ENVELOPE = frozenset({"schema", "seq", "id", "ts"})


@dataclass(frozen=True)
class DeviceFields:
    """What the devices table keeps in columns, read from a status or state document."""

    groups: list[str] | None = None
    agent_version: str | None = None
    online: bool | None = None
    model: str | None = None
    version: int | None = None


def status_fields(doc: Mapping[str, Any]) -> DeviceFields:
    """Groups, agent version and online from a status document (the Last Will too).

    Fields of the wrong type are left out (None): a device's document is untrusted.
    """
    groups = doc.get("groups")
    state = doc.get("state")
    return DeviceFields(
        groups=sorted({g for g in groups if isinstance(g, str)})
        if isinstance(groups, list)
        else None,
        agent_version=_str(doc.get("agent_version")),
        online=state == "online" if state in ("online", "offline") else None,
    )


def state_fields(doc: Mapping[str, Any]) -> DeviceFields:
    """The active release (model, version) and agent version from a state document."""
    version = doc.get("version")
    return DeviceFields(
        agent_version=_str(doc.get("agent_version")),
        model=_str(doc.get("model")),
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
