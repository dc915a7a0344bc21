"""Waiting on shadow runs: when a device's run of a candidate has proven itself.

A shadow step of a rollout (``rollout --shadow``, :mod:`agent.fleet.rollout`) sends its
devices a shadow instruction and waits, through :func:`agent.fleet.deploy.watch`, until
each one's run of it (``shadows[MODEL]`` of its state or telemetry, the fresher:
:func:`agent.fleet.drift.freshest_run`) has compared ``min_frames`` frames — then it
passed, when its candidate failed on at most 5 % of them and, with ``promote_at``, its
agreement reaches that (the device's own promotion rule:
:func:`agent.shadow.agreement.should_promote`). It failed when its run failed (the
candidate could not be fetched, verified or loaded), stopped, or, over ``min_frames``,
erred too often or disagreed. A device already running the candidate passed.

Silence is judged as for a desired state: news is a live report of this run (the same
``issued_at``) that moved on (another phase, more frames compared); a run that stalls,
say a candidate whose every frame the CPU bound skips, says nothing new and fails after
the rollout's ``--timeout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.fleet.deploy import Verdict, Watched, model_state, running_of, same_instant, serves
from agent.fleet.drift import freshest_run, shadow_figures
from agent.fleet.view import FleetView, Report
from agent.shadow.agreement import MAX_ERROR_SHARE, should_promote


def shadow_run(view: FleetView, device_id: str, model: str) -> Mapping[str, Any] | None:
    """The device's latest report of its shadow run of ``model`` (state or telemetry)."""
    device = view.devices.get(device_id)
    if device is None:
        return None

    def part(doc: Mapping[str, Any] | None) -> Any:
        runs = (doc or {}).get("shadows")
        return runs.get(model) if isinstance(runs, Mapping) else None

    run = freshest_run(part(device.state), part(device.telemetry))
    return run if isinstance(run, Mapping) else None


def _agreement(figures: Mapping[str, Any]) -> str:
    value = figures["agreement"]
    shown = "no agreement yet" if value is None else f"{figures['metric']} {value:.3g}"
    return f"{shown} over {figures['frames']:g} frames"


def shadow_verdict(
    run: Mapping[str, Any] | None,
    running: tuple[str | None, int | None],
    online: bool | None,
    *,
    model: str,
    version: int,
    issued_at: float,
    min_frames: int,
    promote_at: float | None,
) -> Verdict:
    """Where a device stands on the shadow run of ``model`` v``version`` issued at
    ``issued_at``, from plain values: its latest report of its shadow run (``run``),
    the release it runs, whether its status says online (the module docstring)."""
    if running == (model, version):
        return Verdict("succeeded", f"runs v{version} already")
    if not isinstance(run, Mapping) or not same_instant(run.get("issued_at"), issued_at):
        return Verdict("pending", "waiting for the device" if online is True else "offline")
    figures = shadow_figures(run) or {}
    phase, error = figures.get("phase"), figures.get("error")
    if phase == "failed":
        return Verdict("failed", f"shadow run failed: {error or 'no reason given'}")
    if phase in ("stopped", "promoted"):
        return Verdict("failed", f"shadow run {phase}{': ' + error if error else ''}")
    if phase != "running":
        return Verdict("pending", str(phase))
    frames, errors = int(figures["frames"] or 0), int(figures["errors"] or 0)
    if frames < min_frames:
        value = figures["agreement"]
        so_far = "" if value is None else f", {figures['metric']} {value:.3g} so far"
        return Verdict("pending", f"running: {frames} of {min_frames} frames compared{so_far}")
    if errors > MAX_ERROR_SHARE * (frames + errors):
        return Verdict(
            "failed",
            f"candidate failed on {errors} of {frames + errors} frames (last: {error})",
        )
    latency = figures.get("latency_ms_p50")
    active = figures.get("active_latency_ms_p50")
    timing = f", {latency:g} ms (active {active:g} ms)" if latency and active else ""
    if promote_at is not None and not should_promote(
        frames=frames,
        errors=errors,
        agreement=figures["agreement"],
        metric=figures["metric"] or "top1",
        min_frames=min_frames,
        min_agreement=promote_at,
    ):
        wanted = (
            f"at most {1 - promote_at:.3g}"
            if figures["metric"] == "mean_error"
            else f"at least {promote_at:g}"
        )
        return Verdict("failed", f"disagrees: {_agreement(figures)}, {wanted} wanted{timing}")
    return Verdict("succeeded", f"{_agreement(figures)}{timing}")


def _progress(run: Mapping[str, Any] | None) -> tuple[Any, ...]:
    figures = shadow_figures(run) or {}
    return (figures.get("phase"), figures.get("frames"), figures.get("errors"))


@dataclass
class ShadowRules:
    """The :class:`agent.fleet.deploy.Rules` of a rollout's shadow step."""

    model: str
    version: int
    min_frames: int
    promote_at: float | None
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # device -> progress

    def judge(self, view: FleetView, w: Watched) -> Verdict:
        device = view.devices.get(w.device)
        state = device.state if device is not None else None
        if device is not None and not serves(state, self.model):
            return Verdict("failed", f"does not serve {self.model}")
        return shadow_verdict(
            shadow_run(view, w.device, self.model),
            running_of(model_state(state, self.model)),
            device.online if device is not None else None,
            model=self.model,
            version=self.version,
            issued_at=w.issued_at,
            min_frames=self.min_frames,
            promote_at=self.promote_at,
        )

    def heard(self, view: FleetView, report: Report, w: Watched) -> bool:
        if report.stream not in ("state", "telemetry"):
            return False
        run = shadow_run(view, w.device, self.model)
        if not isinstance(run, Mapping) or not same_instant(run.get("issued_at"), w.issued_at):
            return False
        progress = _progress(run)
        moved = self.seen.get(w.device) != progress
        self.seen[w.device] = progress
        return moved

    def refused(self, report: Report, w: Watched) -> str | None:
        """A refused instruction (``desired_invalid`` naming its topic), or a
        ``shadow_failed`` of this model and version: a device that serves the model only
        in a cascade refuses the run with that event alone (no run to report)."""
        doc = report.doc or {}
        if report.stream != "events":
            return None
        if doc.get("event") == "desired_invalid" and doc.get("topic") == w.topic:
            return f"refused the shadow instruction: {doc.get('error')}"
        ours = (doc.get("model"), doc.get("version")) == (self.model, self.version)
        if doc.get("event") == "shadow_failed" and ours:
            return f"shadow run failed: {doc.get('error')}"
        return None
