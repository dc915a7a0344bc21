"""Prometheus families of several models (docs/metrics.md): pure, no I/O.

With several models (``pipelines:``, or a cascade beside the single model) the
inference figures carry ``pipeline`` and ``model`` labels, one series per pipeline,
and the update figures a ``model`` label. Shadow runs and output statistics exist in
both config shapes: their families always name the model (and the version).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from agent.contract import (
    STATE_PHASES,
    UPDATE_OUTCOMES,
    CascadeFiguresDoc,
    OutputsDoc,
    ShadowDoc,
    StatePhase,
)
from agent.frames import Stats

SCORE_BINS = tuple(f"{i / 10:.1f}" for i in range(10))  # a bin's lower bound: [.3, .4) is "0.3"


@dataclass(frozen=True)
class PipelineFigures:
    """One pipeline's figures for a scrape."""

    name: str
    model: str  # the model the config names (the series' label, stable across swaps)
    stats: Stats | None  # None: nothing serving on it yet
    cascade: CascadeFiguresDoc | None = None


@dataclass(frozen=True)
class UpdateFigures:
    """One model's update phase and terminal outcomes since start."""

    phase: StatePhase
    outcomes: Mapping[str, int]


def inference(rows: Sequence[tuple[Sequence[str], Stats]], labels: Sequence[str]) -> list[Metric]:
    """The inference families, one sample per row (``labels``' values, its stats);
    no labels and one row: the single-model shape as it always was."""
    model = InfoMetricFamily(
        "edge_agent_model",
        "The model serving now (value 1).",
        labels=[*labels, "version"] if labels else ["model", "version"],
    )
    gauges = {
        "fps": GaugeMetricFamily(
            "edge_agent_inference_fps", "Results per second, recent window.", labels=labels
        ),
        "connected": GaugeMetricFamily(
            "edge_agent_source_connected",
            "1 while the source delivers, 0 while it reconnects.",
            labels=labels,
        ),
    }
    counters = {
        "frames": CounterMetricFamily(
            "edge_agent_frames", "Frames read from the source.", labels=labels
        ),
        "dropped": CounterMetricFamily(
            "edge_agent_frames_dropped",
            "Frames overwritten before inference (live sources only).",
            labels=labels,
        ),
        "results": CounterMetricFamily(
            "edge_agent_results", "Frames the model gave a result for.", labels=labels
        ),
        "errors": CounterMetricFamily(
            "edge_agent_inference_errors",
            "Frames that failed (capture or inference).",
            labels=labels,
        ),
    }
    for values, stats in rows:
        version = "" if stats.version is None else str(stats.version)
        if labels:
            model.add_metric([*values, version], {"backend": stats.backend})
        else:  # the single-model shape: model and version as ever
            model.add_metric([stats.model, version], {"backend": stats.backend})
        gauges["fps"].add_metric(list(values), stats.fps)
        gauges["connected"].add_metric(list(values), float(stats.source_connected))
        counters["frames"].add_metric(list(values), stats.frames)
        counters["dropped"].add_metric(list(values), stats.dropped)
        counters["results"].add_metric(list(values), stats.results)
        counters["errors"].add_metric(list(values), stats.errors)
    if not rows:
        return []
    return [
        model,
        gauges["fps"],
        counters["frames"],
        counters["dropped"],
        counters["results"],
        counters["errors"],
        gauges["connected"],
    ]


def pipelines(found: Sequence[PipelineFigures]) -> list[Metric]:
    """Every serving pipeline's inference figures (``pipeline``, ``model``) and its
    cascade's crops and errors."""
    rows = [((p.name, p.model), p.stats) for p in found if p.stats is not None]
    families = inference(rows, ["pipeline", "model"])
    cascades = [p for p in found if p.cascade is not None]
    if cascades:
        labels = ["pipeline", "model"]
        crops = CounterMetricFamily(
            "edge_agent_cascade_crops", "Crops the cascade model ran on.", labels=labels
        )
        errors = CounterMetricFamily(
            "edge_agent_cascade_errors", "Crops the cascade model failed on.", labels=labels
        )
        for p in cascades:
            assert p.cascade is not None
            crops.add_metric([p.name, p.cascade["model"]], p.cascade["crops"])
            errors.add_metric([p.name, p.cascade["model"]], p.cascade["errors"])
        families += [crops, errors]
    return families


def updates(models: Mapping[str, UpdateFigures]) -> list[Metric]:
    """Each model's update phase and outcomes (``model``)."""
    phase = GaugeMetricFamily(
        "edge_agent_update_phase",
        "The update phase, or the last update's outcome (1 for the current one).",
        labels=["model", "phase"],
    )
    outcomes = CounterMetricFamily(
        "edge_agent_update_outcomes",
        "Updates ended since start, by outcome.",
        labels=["model", "outcome"],
    )
    for name, figures in models.items():
        for value in STATE_PHASES:
            phase.add_metric([name, value], float(value == figures.phase))
        for outcome in UPDATE_OUTCOMES:
            outcomes.add_metric([name, outcome], figures.outcomes.get(outcome, 0))
    return [phase, outcomes]


def shadows(found: Mapping[str, ShadowDoc]) -> list[Metric]:
    """Each model's shadow run (``model``, the candidate's ``version``); agreement is
    absent before the first compared frame."""
    if not found:
        return []
    labels = ["model", "version"]
    info = InfoMetricFamily(
        "edge_agent_shadow", "A shadow run and its phase (value 1).", labels=labels
    )
    frames = CounterMetricFamily(
        "edge_agent_shadow_frames", "Frames the candidate ran on and was compared.", labels=labels
    )
    skipped = CounterMetricFamily(
        "edge_agent_shadow_skipped", "Sampled frames skipped for the CPU bound.", labels=labels
    )
    errors = CounterMetricFamily(
        "edge_agent_shadow_errors", "Frames the candidate failed on.", labels=labels
    )
    agreement = GaugeMetricFamily(
        "edge_agent_shadow_agreement",
        "The candidate's agreement with the active model (top1, f1: 0-1; mean_error).",
        labels=[*labels, "metric"],
    )
    for name, doc in found.items():
        values = [name, str(doc["version"])]
        info.add_metric(values, {"phase": doc["phase"]})
        frames.add_metric(values, doc["frames"])
        skipped.add_metric(values, doc["skipped"])
        errors.add_metric(values, doc["errors"])
        value = doc["agreement"]["value"]
        if value is not None:
            agreement.add_metric([*values, doc["agreement"]["metric"]], value)
    return [info, frames, skipped, errors, agreement]


def outputs(found: Mapping[str, OutputsDoc]) -> list[Metric]:
    """The serving version's output statistics (``model``, ``version``): frames, the
    top score's bins and the class mix (the figures drift compares)."""
    if not found:
        return []
    frames = CounterMetricFamily(
        "edge_agent_output_frames",
        "Frames the serving version gave an output for.",
        labels=["model", "version"],
    )
    scores = CounterMetricFamily(
        "edge_agent_output_score_frames",
        "Frames by their top score's bin (bin: the lower bound, width 0.1).",
        labels=["model", "version", "bin"],
    )
    classes = CounterMetricFamily(
        "edge_agent_output_class_frames",
        "Frames where the label was top (classification) or detected.",
        labels=["model", "version", "label"],
    )
    for name, doc in found.items():
        version = "" if doc["version"] is None else str(doc["version"])
        frames.add_metric([name, version], doc["frames"])
        for bin_, count in zip(SCORE_BINS, doc["scores"], strict=False):
            scores.add_metric([name, version, bin_], count)
        for label, count in doc["classes"].items():
            classes.add_metric([name, version, label], count)
    return [frames, scores, classes]
