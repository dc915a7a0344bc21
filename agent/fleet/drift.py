"""Drift across an update, from a device's output statistics (telemetry ``outputs``).

A device keeps, per model, the statistics of the version it serves since it became
active and of the version before it (``previous``)::

    "outputs": {MODEL: {"version": V, "frames": N, "scores": [10 counts],
                        "classes": {LABEL: count}, "previous": {same, no previous} | null}}

``scores`` counts frames by their top score in bins [0, .1), …, [.9, 1]; ``classes``
counts frames where a label is the top one (classification) or detected. Drift is the
total variation distance (half the L1 distance of the two distributions: 0 the same,
1 disjoint) between ``previous`` and the current version, of the class mix and of the
score histogram; either above :data:`THRESHOLD` flags the device. Pure functions over
documents a device sent: anything malformed gives None, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

THRESHOLD = 0.3
BINS = 10


def tvd(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Total variation distance of two count vectors (keys: categories) once each is
    normalised; None when either has no counts."""
    total_a, total_b = sum(a.values()), sum(b.values())
    if total_a <= 0 or total_b <= 0:
        return None
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) / total_a - b.get(k, 0.0) / total_b) for k in keys)


def _count(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _scores(doc: Mapping[str, Any]) -> dict[str, float] | None:
    scores = doc.get("scores")
    if not isinstance(scores, list) or len(scores) != BINS:
        return None
    counts = [_count(v) for v in scores]
    if any(c is None for c in counts):
        return None
    return {str(i): c for i, c in enumerate(counts) if c is not None}


def _classes(doc: Mapping[str, Any]) -> dict[str, float] | None:
    classes = doc.get("classes")
    if not isinstance(classes, Mapping):
        return None
    counts = {str(k): _count(v) for k, v in classes.items()}
    if any(c is None for c in counts.values()):
        return None
    return {k: c for k, c in counts.items() if c is not None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def drift(outputs: Any) -> dict[str, Any] | None:
    """The drift of one model's ``outputs`` entry: ``{"version", "previous_version",
    "frames", "previous_frames", "classes": TVD | None, "scores": TVD | None,
    "flagged": bool}``; None when there is no usable ``previous`` to compare with."""
    if not isinstance(outputs, Mapping):
        return None
    previous = outputs.get("previous")
    if not isinstance(previous, Mapping):
        return None
    now_classes, was_classes = _classes(outputs), _classes(previous)
    now_scores, was_scores = _scores(outputs), _scores(previous)
    classes = tvd(was_classes, now_classes) if now_classes is not None and was_classes else None
    scores = tvd(was_scores, now_scores) if now_scores is not None and was_scores else None
    if classes is None and scores is None:
        return None
    return {
        "version": outputs.get("version"),
        "previous_version": previous.get("version"),
        "frames": _count(outputs.get("frames")),
        "previous_frames": _count(previous.get("frames")),
        "classes": _round(classes),
        "scores": _round(scores),
        "flagged": any(v is not None and v > THRESHOLD for v in (classes, scores)),
    }


def shadow_figures(run: Any) -> dict[str, Any] | None:
    """The figures of a shadow run (a ShadowDoc from state or telemetry ``shadows``)
    ``status`` shows: version, phase, frames, skipped, errors, latencies, agreement."""
    if not isinstance(run, Mapping):
        return None
    agreement = run.get("agreement")
    agreement = agreement if isinstance(agreement, Mapping) else {}
    value = _count(agreement.get("value"))
    phase = run.get("phase")
    version = run.get("version")
    return {
        "version": version if isinstance(version, int) and not isinstance(version, bool) else None,
        "phase": phase if isinstance(phase, str) else None,
        "frames": _count(run.get("frames")),
        "skipped": _count(run.get("skipped")),
        "errors": _count(run.get("errors")),
        "latency_ms_p50": _count(run.get("latency_ms_p50")),
        "active_latency_ms_p50": _count(run.get("active_latency_ms_p50")),
        "metric": agreement.get("metric") if isinstance(agreement.get("metric"), str) else None,
        "agreement": value,
        "error": run.get("error") if isinstance(run.get("error"), str) else None,
    }


def _progress(run: Mapping[str, Any]) -> tuple[float, float]:
    """A shadow run document's place in time: its run (issued_at), then how far that
    run got (frames compared, skipped and failed only grow within a run)."""
    issued = _count(run.get("issued_at")) or 0.0
    done = sum(_count(run.get(k)) or 0.0 for k in ("frames", "skipped", "errors"))
    return issued, done


def freshest_run(state: Any, telemetry: Any) -> Any:
    """The newer of a device's two reports of one model's shadow run: its retained
    state (published when the run's phase changes, so its figures stop there) and its
    latest telemetry (every interval). The later run wins, then the one further on;
    on a tie the state (it carries the newest phase). Either may be missing (None)."""
    if not isinstance(telemetry, Mapping):
        return state
    if not isinstance(state, Mapping):
        return telemetry
    return telemetry if _progress(telemetry) > _progress(state) else state
