"""``edge-fleet status --model M``: which versions of M run where, what is desired, the
shadow runs of a candidate and the drift of the outputs across an update.

A device counts as serving M when its state's ``models`` names M (several pipelines,
cascade models too) or, from an older agent, when its top-level state does. Drift and
shadow figures come from what each device reports (:mod:`agent.fleet.drift`): retained
telemetry ``outputs[M]``, and ``shadows[M]`` of its state or of its telemetry, whichever
is further on (the state's figures stop at the run's last phase change).
"""

from __future__ import annotations

import datetime
from typing import Any

from agent.fleet.drift import THRESHOLD, drift, freshest_run, shadow_figures
from agent.fleet.reports import printable
from agent.fleet.view import ACTIVE_PHASES, FleetView, number


def _when(ts: Any) -> str:
    value = number(ts)
    if value is None:
        return printable(str(ts), 40)
    try:
        moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):  # a time out of range
        return printable(str(ts), 40)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _part(doc: dict[str, Any] | None, name: str, model: str) -> Any:
    part = (doc or {}).get(name)
    return part.get(model) if isinstance(part, dict) else None


def model_status(view: FleetView, model: str) -> dict[str, Any]:
    """``edge-fleet status --model``: which versions run where, what is desired, the
    shadow runs (instructions retained and the devices' figures) and the drift."""
    versions: dict[str, list[str]] = {}
    updating: list[dict[str, Any]] = []
    offline: list[str] = []
    bad: dict[str, list[str]] = {}
    drifts: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for device in view.reporting():
        part = device.served().get(model)
        if part is None:
            continue
        version = part.get("version")
        key = str(version) if isinstance(version, int) else "none"
        versions.setdefault(key, []).append(device.id)
        if device.online is False:
            offline.append(device.id)
        update, phase = part.get("update"), part.get("phase")
        if phase in ACTIVE_PHASES and isinstance(update, dict):
            updating.append({"device": device.id, "version": update.get("version"), "phase": phase})
        marks = part.get("bad")
        for mark in marks if isinstance(marks, list) else []:
            name, _, marked = str(mark).partition("@")
            if name == model:
                bad.setdefault(marked, []).append(device.id)
        moved = drift(_part(device.telemetry, "outputs", model))
        if moved is not None:
            drifts[device.id] = moved
        run = freshest_run(
            _part(device.state, "shadows", model), _part(device.telemetry, "shadows", model)
        )
        figures = shadow_figures(run)
        if figures is not None:
            runs[device.id] = figures
    instructions = {
        "groups": {g: docs[model] for g, docs in view.group_shadows.items() if model in docs},
        "devices": {d.id: d.shadows[model] for d in view.devices.values() if model in d.shadows},
    }
    return {
        "model": model,
        "versions": dict(sorted(versions.items(), key=lambda kv: kv[0])),
        "offline": offline,
        "updating": updating,
        "bad": bad,
        "desired": view.desired_for(model),
        "shadow": instructions,
        "shadows": runs,
        "drift": drifts,
        "drift_threshold": THRESHOLD,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_text(status: dict[str, Any]) -> str:
    lines = [f"model {status['model']}"]
    offline = set(status["offline"])
    if not status["versions"]:
        lines.append("  no device reports running it")
    for version, devices in status["versions"].items():
        names = ", ".join(f"{d} (offline)" if d in offline else d for d in devices)
        count = f"{len(devices)} device" + ("s" if len(devices) != 1 else "")
        label = f"v{version}" if version != "none" else "nothing active"
        lines.append(f"  {label:<8} {count:<10} {names}")
    for item in status["updating"]:
        lines.append(f"  updating: {item['device']} -> v{item['version']} ({item['phase']})")
    for version, devices in sorted(status["bad"].items()):
        lines.append(f"  refused v{version} (marked bad): {', '.join(devices)}")
    for what, key in (("desired", "desired"), ("shadow", "shadow")):
        for kind in ("groups", "devices"):
            for name, doc in sorted(status[key].get(kind, {}).items()):
                issued = _when(doc.get("issued_at"))
                extra = f", {doc.get('sample_pct')} % of frames" if what == "shadow" else ""
                release = f"v{doc.get('version')}"
                lines.append(f"  {what}: {kind[:-1]} {name} -> {release} (issued {issued}{extra})")
    for device, run in sorted(status.get("shadows", {}).items()):
        agreement = f"{run['metric'] or 'agreement'} {_fmt(run['agreement'])}"
        frames = int(run["frames"]) if run["frames"] is not None else "-"
        tail = f": {run['error']}" if run["error"] else ""
        lines.append(
            f"  shadow run: {device} v{run['version']} {run['phase']}, {agreement} over "
            f"{frames} frames, p50 {_fmt(run['latency_ms_p50'], 1)} ms (active "
            f"{_fmt(run['active_latency_ms_p50'], 1)} ms), {_fmt(run['errors'], 0)} errors{tail}"
        )
    for device, moved in sorted(status.get("drift", {}).items()):
        flag = "  DRIFT" if moved["flagged"] else ""
        lines.append(
            f"  drift: {device} v{moved['previous_version']} -> v{moved['version']}: classes "
            f"{_fmt(moved['classes'])}, scores {_fmt(moved['scores'])}{flag}"
        )
    return "\n".join(lines)
