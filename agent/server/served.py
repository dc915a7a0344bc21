"""What a device serves, from its last state and telemetry documents (issue 20): every
model (``state.models``, or the top-level fields of an agent with one model), every
pipeline's figures (telemetry ``pipelines``), each shadow run (``shadows``) and the
drift of each model's outputs across its last update (telemetry ``outputs``, measured by
:func:`agent.fleet.drift.drift`).

Shared by ``GET /api/v1/devices[/{id}]`` and the dashboard's device page. Pure functions
over documents a device sent, hence hostile: anything malformed is left out or None,
never an exception; every list holds at most :data:`MAX_SERVED` entries and every name
at most :data:`MAX_NAME` characters (a device with 60 models shows 32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from agent.fleet.drift import drift, shadow_figures

MAX_SERVED = 32  # models, pipelines, shadow runs or drifts listed per device
MAX_NAME = 128  # characters of a model or pipeline name shown (a model name's most)


class UpdateInfo(BaseModel):
    """The device's latest update, from its state document."""

    id: str | None = None
    model: str | None = None
    version: int | None = None
    phase: str | None = Field(None, description="downloading … probation while under way")
    outcome: str | None = Field(None, description="succeeded, failed, rolled_back; or null")
    reason: str | None = None


class ServedModel(BaseModel):
    """One model a device serves, from its state (``models``, or the top-level fields
    of an agent with one model)."""

    version: int | None = None
    phase: str | None = None
    backend: str | None = None
    update: UpdateInfo | None = None
    last_error: str | None = None


class CascadeFigures(BaseModel):
    model: str | None = None
    version: int | None = None
    crops: float | None = None
    infer_ms_p50: float | None = None
    errors: float | None = None


class PipelineFigures(BaseModel):
    """One pipeline: what it runs (state ``pipelines``) and its figures (the latest
    telemetry's ``pipelines``; null unless the device is online and the telemetry
    recent)."""

    name: str
    model: str | None = None
    cascade_model: str | None = None
    source: str | None = None
    fps: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    frames: float | None = None
    errors: float | None = None
    cascade: CascadeFigures | None = None


class ShadowRun(BaseModel):
    """A shadow run of a model's candidate (live telemetry's ``shadows``, else the
    state's)."""

    model: str
    version: int | None = None
    phase: str | None = None
    frames: float | None = None
    skipped: float | None = None
    errors: float | None = None
    error: str | None = None
    latency_ms_p50: float | None = None
    active_latency_ms_p50: float | None = None
    metric: str | None = Field(None, description="top1, f1 or mean_error")
    agreement: float | None = None


class Drift(BaseModel):
    """How far a model's outputs moved across its last update: total variation
    distance (0..1) of the class mix and of the top-score histogram between the
    version before and the one serving; flagged above 0.3."""

    model: str
    version: int | None = None
    previous_version: int | None = None
    frames: float | None = None
    previous_frames: float | None = None
    classes: float | None = None
    scores: float | None = None
    flagged: bool = False


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _entries(doc: Any) -> list[tuple[str, Any]]:
    """A document's ``{NAME: part}`` entries whose part is an object, at most
    :data:`MAX_SERVED`, names cut to :data:`MAX_NAME`."""
    if not isinstance(doc, Mapping):
        return []
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if len(out) >= MAX_SERVED:
            break
        if isinstance(value, Mapping):
            out.setdefault(str(key)[:MAX_NAME], value)  # cut names alike: the first
    return list(out.items())


def update_info(doc: Mapping[str, Any]) -> UpdateInfo:
    return UpdateInfo(
        id=_text(doc.get("id")),
        model=_text(doc.get("model")),
        version=_int(doc.get("version")),
        phase=_text(doc.get("phase")),
        outcome=_text(doc.get("outcome")),
        reason=_text(doc.get("reason")),
    )


def served(state: Any) -> dict[str, ServedModel]:
    """Every model the state says the device serves."""
    state = state if isinstance(state, Mapping) else {}
    models = state.get("models")
    if not isinstance(models, Mapping):
        model = state.get("model")
        models = {model: state} if isinstance(model, str) else {}
    out = {}
    for name, part in _entries(models):
        update = part.get("update")
        out[name] = ServedModel(
            version=_int(part.get("version")),
            phase=_text(part.get("phase")),
            backend=_text(part.get("backend")),
            update=update_info(update) if isinstance(update, Mapping) else None,
            last_error=_text(part.get("last_error")),
        )
    return out


def _cascade(doc: Any) -> CascadeFigures | None:
    if not isinstance(doc, Mapping):
        return None
    model = _text(doc.get("model"))
    return CascadeFigures(
        model=model[:MAX_NAME] if model else None,
        version=_int(doc.get("version")),
        crops=_number(doc.get("crops")),
        infer_ms_p50=_number(doc.get("infer_ms_p50")),
        errors=_number(doc.get("errors")),
    )


def pipelines(state: Any, live: Mapping[str, Any]) -> list[PipelineFigures]:
    """Every pipeline, in the state's order (then any only the telemetry names), with
    the figures of ``live`` (the telemetry when it is live, else ``{}``)."""
    state = state if isinstance(state, Mapping) else {}
    named = dict(_entries(state.get("pipelines")))
    figures = dict(_entries(live.get("pipelines")))
    out = []
    for name in list(dict.fromkeys([*named, *figures]))[:MAX_SERVED]:
        what, figs = named.get(name, {}), figures.get(name, {})
        model = _text(what.get("model")) or _text(figs.get("model"))
        cascade = _text(what.get("cascade"))
        out.append(
            PipelineFigures(
                name=name,
                model=model[:MAX_NAME] if model else None,
                cascade_model=cascade[:MAX_NAME] if cascade else None,
                source=_text(what.get("source")),
                fps=_number(figs.get("fps")),
                latency_ms_p50=_number(figs.get("latency_ms_p50")),
                latency_ms_p95=_number(figs.get("latency_ms_p95")),
                frames=_number(figs.get("frames")),
                errors=_number(figs.get("errors")),
                cascade=_cascade(figs.get("cascade")),
            )
        )
    return out


def shadows(state: Any, live: Mapping[str, Any]) -> list[ShadowRun]:
    """Each shadow run: the live telemetry's figures (fresher), else the state's."""
    state = state if isinstance(state, Mapping) else {}
    runs = dict(_entries(state.get("shadows")))
    runs.update(_entries(live.get("shadows")))
    out = []
    for model, run in list(runs.items())[:MAX_SERVED]:
        figures = shadow_figures(run) or {}
        out.append(ShadowRun(model=model, **figures))
    return out


def drifts(telemetry: Any) -> list[Drift]:
    """The drift of each model whose output statistics have a previous version (from
    the latest telemetry, live or not: the statistics are cumulative)."""
    telemetry = telemetry if isinstance(telemetry, Mapping) else {}
    out = []
    for model, outputs in _entries(telemetry.get("outputs")):
        found = drift(outputs)
        if found is not None:
            found["version"] = _int(found.get("version"))
            found["previous_version"] = _int(found.get("previous_version"))
            out.append(Drift(model=model, **found))
    return out
