"""The ``pipelines`` section (several models on one device) and ``cascade``.

``pipelines:`` lists 1..8 pipelines, each with its own ``model``, ``source``,
``results`` and optional ``cascade``; it is exclusive with the single top-level
``model``/``source``/``results``/``cascade``, which still work as before (one pipeline
named ``main``). :func:`pipeline_list` gives the pipelines of either shape and
:func:`served_models` every model served (primary and cascade, each once).

The pipelines' entries are validated by :func:`agent.config.config_from_dict` key by key
(a pipeline's ``source`` is a union of kinds, picked by its ``type`` as the top-level
``source`` is); the rules between entries are :func:`pipeline_problems` (pure: key paths
and messages). Conventions as in :mod:`agent.config_sections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from agent.config_sections import ModelConfig, ResultsConfig, Section
from agent.config_sources import CameraSource, SourceConfig
from agent.structs import rule_pattern

if TYPE_CHECKING:
    from agent.config import Config

PIPELINE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
PIPELINE_NAME_RULE = "letters, digits, '_' and '-', starting with a letter or digit, at most 32"
LEGACY_PIPELINE = "main"  # the one pipeline of a config without ``pipelines``
MAX_PIPELINES = 8
PIPELINE_KEYS = ("name", "model", "source", "results", "cascade")
EXCLUSIVE = ("model", "source", "results", "cascade")  # top-level keys pipelines replaces


class CascadeConfig(Section, frozen=True):
    model: Annotated[
        ModelConfig, Meta(description="The second model, run on crops of the detections.")
    ] = msgspec.field(default_factory=ModelConfig)
    labels: Annotated[
        tuple[Annotated[str, Meta(min_length=1)], ...],
        Meta(description="Crop detections with these labels only (empty: all)."),
    ] = ()
    max_crops: Annotated[
        int, Meta(ge=1, le=32, description="Most crops per frame, best detection scores first.")
    ] = 4
    min_score: Annotated[
        Annotated[float, Meta(ge=0, le=1)] | None,
        Meta(
            description="Lowest detection score cropped (default: the pipeline's "
            "results.min_score)."
        ),
    ] = None
    padding: Annotated[
        float,
        Meta(ge=0, le=1, description="Share of the box's width/height added on each side."),
    ] = 0.1
    min_size: Annotated[
        int, Meta(ge=1, le=8192, description="Pixels: a smaller crop (either side) is skipped.")
    ] = 16


class PipelineConfig(Section, frozen=True):
    name: Annotated[
        str,
        Meta(
            pattern=rule_pattern(PIPELINE_NAME_PATTERN, PIPELINE_NAME_RULE),
            description="The pipeline's name, unique; a topic level (results/NAME).",
        ),
    ]
    model: Annotated[ModelConfig, Meta(description="Its model (name required).")] = msgspec.field(
        default_factory=ModelConfig
    )
    source: Annotated[
        SourceConfig, Meta(description="Its input stream, as the top-level source.")
    ] = msgspec.field(default_factory=CameraSource)
    results: Annotated[ResultsConfig, Meta(description="Its result publishing.")] = msgspec.field(
        default_factory=ResultsConfig
    )
    cascade: Annotated[
        CascadeConfig | None, Meta(description="A second model on crops of its detections.")
    ] = None


Located = tuple[tuple[str | int, ...], str]


def pipeline_problems(pipelines: Sequence[PipelineConfig]) -> list[Located]:
    """The rules between pipelines (pure): names unique, a model name each, a cascade
    model other than its pipeline's, one channel per model."""
    problems: list[Located] = []
    names: dict[str, int] = {}
    channels: dict[str, tuple[str, tuple[str | int, ...]]] = {}
    for index, pipeline in enumerate(pipelines):
        where: tuple[str | int, ...] = ("pipelines", index)
        if pipeline.name in names:
            problems.append(((*where, "name"), f"{pipeline.name!r} is used twice"))
        names.setdefault(pipeline.name, index)
        models = [((*where, "model"), pipeline.model)]
        if pipeline.cascade is not None:
            models.append(((*where, "cascade", "model"), pipeline.cascade.model))
        for path, model in models:
            if model.name is None:
                problems.append(((*path, "name"), "required: every pipeline names its model(s)"))
                continue
            seen = channels.setdefault(model.name, (model.channel, path))
            if seen[0] != model.channel:
                problems.append(
                    (
                        (*path, "channel"),
                        f"{model.channel!r}, but {dotted_path(seen[1])} follows "
                        f"{seen[0]!r} for model {model.name!r}; a model follows one channel",
                    )
                )
        problems += cascade_problems(pipeline, where)
    return problems


def cascade_problems(pipeline: PipelineConfig, where: tuple[str | int, ...]) -> list[Located]:
    """A cascade's model must be another model than its pipeline's."""
    cascade = pipeline.cascade
    if cascade is None or cascade.model.name is None:
        return []
    if cascade.model.name == pipeline.model.name:
        return [
            (
                (*where, "cascade", "model", "name"),
                f"{cascade.model.name!r} is the pipeline's own model; a cascade runs a "
                "second model on the first one's detections",
            )
        ]
    return []


def dotted_path(path: tuple[str | int, ...]) -> str:
    """``pipelines[1].model`` for ``("pipelines", 1, "model")``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def pipeline_list(config: Config) -> tuple[PipelineConfig, ...]:
    """The pipelines of ``config``: its ``pipelines``, else one named ``main`` of the
    top-level model, source, results and cascade."""
    if config.pipelines:
        return config.pipelines
    return (
        PipelineConfig(
            name=LEGACY_PIPELINE,
            model=config.model,
            source=config.source,
            results=config.results,
            cascade=config.cascade,
        ),
    )


def served_models(pipelines: Sequence[PipelineConfig]) -> dict[str, ModelConfig]:
    """Every model the pipelines serve, by name, each once, in order: each pipeline's
    model, then its cascade's. A model without a name (the single-model shape without
    a registry) is left out."""
    models: dict[str, ModelConfig] = {}
    for pipeline in pipelines:
        for model in (pipeline.model, pipeline.cascade.model if pipeline.cascade else None):
            if model is not None and model.name is not None:
                models.setdefault(model.name, model)
    return models
