"""The verdict on a device's shadow run in a shadow rollout's step
(:func:`agent.fleet.shadow_watch.shadow_verdict`), as a table."""

from __future__ import annotations

from typing import Any

import pytest

from agent.fleet.deploy import Watched
from agent.fleet.shadow_watch import ShadowRules, shadow_verdict
from agent.fleet.view import Report

ISSUED = 1764499990.0


def _run(**fields: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "model": "m",
        "version": 3,
        "issued_at": ISSUED,
        "phase": "running",
        "frames": 120,
        "skipped": 0,
        "errors": 0,
        "error": None,
        "latency_ms_p50": 2.0,
        "active_latency_ms_p50": 1.5,
        "agreement": {"metric": "top1", "value": 0.97, "frames": 120},
    }
    return run | fields


def _agreement(metric: str, value: float | None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "frames": 120}


CASES = [
    # (what, run, running, online, promote_at, status, detail starts with)
    ("runs it already", None, ("m", 3), True, 0.9, "succeeded", "runs v3 already"),
    ("nothing yet", None, ("m", 2), True, 0.9, "pending", "waiting for the device"),
    ("nothing, offline", None, ("m", 2), False, 0.9, "pending", "offline"),
    ("an older run", _run(issued_at=ISSUED - 60), ("m", 2), True, None, "pending", "waiting"),
    ("downloading", _run(phase="downloading"), ("m", 2), True, None, "pending", "downloading"),
    (
        "too few frames",
        _run(frames=99),
        ("m", 2),
        True,
        0.9,
        "pending",
        "running: 99 of 100 frames compared, top1 0.97 so far",
    ),
    (
        "failed",
        _run(phase="failed", error="bad signature"),
        ("m", 2),
        True,
        None,
        "failed",
        "shadow run failed: bad signature",
    ),
    ("stopped", _run(phase="stopped"), ("m", 2), True, None, "failed", "shadow run stopped"),
    ("agrees", _run(), ("m", 2), True, 0.9, "succeeded", "top1 0.97 over 120 frames, 2 ms"),
    (
        "no gate",
        _run(agreement=_agreement("top1", 0.1)),
        ("m", 2),
        True,
        None,
        "succeeded",
        "top1 0.1 over",
    ),
    (
        "disagrees",
        _run(agreement=_agreement("top1", 0.5)),
        ("m", 2),
        True,
        0.9,
        "failed",
        "disagrees: top1 0.5 over 120 frames, at least 0.9 wanted",
    ),
    (
        "f1 agrees",
        _run(agreement=_agreement("f1", 0.95)),
        ("m", 2),
        True,
        0.9,
        "succeeded",
        "f1 0.95",
    ),
    (
        "error low",
        _run(agreement=_agreement("mean_error", 0.05)),
        ("m", 2),
        True,
        0.9,
        "succeeded",
        "mean_error 0.05",
    ),
    (
        "error high",
        _run(agreement=_agreement("mean_error", 0.2)),
        ("m", 2),
        True,
        0.9,
        "failed",
        "disagrees: mean_error 0.2 over 120 frames, at most 0.1 wanted",
    ),
    (
        "errs",
        _run(errors=7, error="invoke failed"),
        ("m", 2),
        True,
        None,
        "failed",
        "candidate failed on 7 of 127 frames (last: invoke failed)",
    ),
    ("errs a little", _run(errors=6), ("m", 2), True, None, "succeeded", "top1 0.97"),
]


@pytest.mark.parametrize(
    ("run", "running", "online", "promote_at", "status", "detail"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_shadow_verdict(
    run: dict[str, Any] | None,
    running: tuple[str, int],
    online: bool,
    promote_at: float | None,
    status: str,
    detail: str,
) -> None:
    verdict = shadow_verdict(
        run,
        running,
        online,
        model="m",
        version=3,
        issued_at=ISSUED,
        min_frames=100,
        promote_at=promote_at,
    )
    assert (verdict.status, verdict.detail[: len(detail)]) == (status, detail), verdict


REFUSALS = [
    # (event document, why or None)
    ({"event": "desired_invalid", "topic": "edge/d/shadow/m", "error": "signature: bad"},
     "refused the shadow instruction: signature: bad"),
    ({"event": "desired_invalid", "topic": "edge/d/shadow/other", "error": "x"}, None),
    ({"event": "shadow_failed", "model": "m", "version": 3, "error": "m is a cascade model"},
     "shadow run failed: m is a cascade model"),
    ({"event": "shadow_failed", "model": "m", "version": 2, "error": "an older run"}, None),
    ({"event": "shadow_failed", "model": "other", "version": 3, "error": "x"}, None),
    ({"event": "shadow_started", "model": "m", "version": 3}, None),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "why"), REFUSALS)
def test_shadow_refusals(doc: dict[str, Any], why: str | None) -> None:
    rules = ShadowRules("m", 3, min_frames=100, promote_at=None)
    watched = Watched("d", "edge/d/shadow/m", ISSUED)
    assert rules.refused(Report("d", "events", doc, retained=False), watched) == why
    assert rules.refused(Report("d", "state", doc, retained=False), watched) is None
