"""Pure rules of the server's storage: minute buckets, retention cut-offs, and the fields
the server keeps from a device's documents. No I/O; tested by tables."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import MODEL_NAME_PATTERN
from agent.fleet.acl import check_group_name

DAY_S = 86_400.0
BUCKET_S = 60.0
MAX_SAMPLES = 200  # numeric fields kept from one telemetry document
MAX_METRIC = 128  # characters of a metric name (telemetry_raw.metric)
MAX_GROUPS = 64  # groups kept from one status document
MAX_MODELS = 32  # models kept from one state document (device_models rows)
MAX_NAME = 128  # characters of a group name (device_groups.group_name)
MAX_AGENT_VERSION = 64  # characters (devices.agent_version)
MAX_UPDATE_ID = 64  # characters (events.update_id)
MAX_AHEAD_S = DAY_S  # a device's ts further ahead of the server's clock is not believed


def stored_time(ts: float | None, received: float) -> float:
    """The time a device's message is stored under: its own ``ts`` (a replayed outbox
    sends old ones, kept as they are), unless it has none or it is more than
    :data:`MAX_AHEAD_S` ahead of ``received`` (the server's clock), then ``received``:
    rows stamped years ahead would outlive every retention cut-off and pin a device's
    "newest" telemetry."""
    if ts is None or not math.isfinite(ts) or ts > received + MAX_AHEAD_S:
        return received
    return ts


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


def numeric_samples(doc: Mapping[str, Any]) -> dict[str, float]:
    """The telemetry document's finite numbers, nested keys joined by ``.``.

    ``{"cpu_pct": 3.5, "inference": {"fps": 9.8, "backend": "cpu"}, "temp_c": None}``
    gives ``{"cpu_pct": 3.5, "inference.fps": 9.8}``. Booleans, strings, nulls, lists,
    NaN and infinities are left out, and so is the envelope (``schema``, ``seq``,
    ``id``, ``ts``). Every sample is a row and an upsert: at most :data:`MAX_SAMPLES`
    are kept (in document order; an agent sends about 25), and a name longer than
    :data:`MAX_METRIC` characters (the column) is left out, so a device cannot make one
    message cost thousands of writes.
    """
    out: dict[str, float] = {}
    for name, number in _numbers(doc, ""):
        if len(out) >= MAX_SAMPLES:
            break
        if len(name) <= MAX_METRIC:
            out[name] = number
    return out


def _numbers(doc: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in doc.items():
        if not prefix and key in ENVELOPE:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                yield name, number


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

    Fields of the wrong type, or longer than their column, are left out (None): a
    device's document is untrusted.
    """
    groups = doc.get("groups")
    state = doc.get("state")
    return DeviceFields(
        groups=usable_groups(groups) if isinstance(groups, list) else None,
        agent_version=_str(doc.get("agent_version"), MAX_AGENT_VERSION),
        online=state == "online" if state in ("online", "offline") else None,
    )


def usable_groups(names: list[Any]) -> list[str]:
    """The group names of a status document that the fleet accepts as group names
    (:func:`agent.fleet.acl.check_group_name`: a topic level, no ``+ # /``; at most
    :data:`MAX_NAME` characters, the column), sorted,
    without repeats, at most :data:`MAX_GROUPS`: each is a row of ``device_groups``."""
    valid = {
        g
        for g in names
        if isinstance(g, str) and len(g) <= MAX_NAME and check_group_name(g) is None
    }
    return sorted(valid)[:MAX_GROUPS]


def state_fields(doc: Mapping[str, Any]) -> DeviceFields:
    """The active release (model, version) and agent version from a state document."""
    version = doc.get("version")
    return DeviceFields(
        agent_version=_str(doc.get("agent_version"), MAX_AGENT_VERSION),
        model=model_name(doc.get("model")),
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


def served_models(doc: Mapping[str, Any]) -> dict[str, int | None]:
    """Every model a state document says the device serves, with its version: the
    top-level model (an agent with one model; the first pipeline's otherwise) and each
    of ``models`` (several pipelines or a cascade), at most :data:`MAX_MODELS`; names
    that are not model names and versions that are not integers are left out. A row of
    ``device_models`` each."""
    out: dict[str, int | None] = {}
    top = model_name(doc.get("model"))
    if top is not None:
        out[top] = _version(doc.get("version"))
    models = doc.get("models")
    if isinstance(models, Mapping):
        for name, part in models.items():
            if len(out) >= MAX_MODELS:
                break
            if model_name(name) is not None and isinstance(part, Mapping):
                out[name] = _version(part.get("version"))
    return out


def _version(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


def _str(value: object, limit: int) -> str | None:
    """A string of at most ``limit`` characters (its column), else None (not kept)."""
    return value if isinstance(value, str) and len(value) <= limit else None


def model_name(value: object) -> str | None:
    """A model name as the agent's config accepts it (:data:`MODEL_NAME_PATTERN`), else
    None: what a device reports running becomes a column, a filter and a label of
    ``/metrics``."""
    if isinstance(value, str) and re.fullmatch(MODEL_NAME_PATTERN, value):
        return value
    return None
