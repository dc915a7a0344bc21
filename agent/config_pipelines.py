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

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from agent.config_sections import ModelConfig, ResultsConfig, Section
from agent.config_sources import CameraSource, SourceConfig
from agent.structs import locate, rule_pattern

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
    top_k: Annotated[
        int,
        Meta(
            ge=1,
            le=100,
            description="Most classes or boxes nested per crop, best first (the second "
            "model's; its min_score is the pipeline's results.min_score).",
        ),
    ] = 5


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


# -- reading the entries (agent.config lends its section reader) ----------------------

SectionReader = Callable[[str, type[msgspec.Struct], Any], "msgspec.Struct | list[Located]"]
SourceKind = Callable[[Any], "type[msgspec.Struct] | str"]


def _keyed(
    where: tuple[str | int, ...], found: msgspec.Struct | list[Located]
) -> msgspec.Struct | list[Located]:
    """``found`` with the key paths of its problems put under ``where``."""
    if isinstance(found, list):
        return [((*where, *path[1:]), message) for path, message in found]
    return found


class PipelineReader:
    """Reads ``pipelines`` and ``cascade`` with the config's reader of one section
    (``section(name, kind, value)``: every wrong key, else the first rule broken) and
    of a ``source``'s kind (by its ``type``)."""

    def __init__(self, section: SectionReader, source_kind: SourceKind) -> None:
        self.section = section
        self.source_kind = source_kind

    def _entry(
        self, where: tuple[str | int, ...], name: str, kind: type[msgspec.Struct], value: Any
    ) -> msgspec.Struct | list[Located]:
        """One struct of a pipeline (or the top-level cascade), validated as a section."""
        if isinstance(value, dict):
            unknown = [k for k in value if k not in kind.__struct_fields__]
            if unknown:
                return [
                    ((*where, k if isinstance(k, str) else repr(k)), "unknown key") for k in unknown
                ]
        return _keyed(where, self.section(name, kind, value))

    def cascade(self, value: Any) -> CascadeConfig | list[Located] | None:
        """The top-level ``cascade`` (None: unset), or its problems."""
        if value is None:
            return None
        found = self._entry(("cascade",), "cascade", CascadeConfig, value)
        return found if isinstance(found, (list, CascadeConfig)) else [(("cascade",), "invalid")]

    def _pipeline(self, index: int, value: Any) -> PipelineConfig | list[Located]:
        where: tuple[str | int, ...] = ("pipelines", index)
        if not isinstance(value, dict):
            return [(where, "must be a mapping with name, model, source, results, cascade")]
        problems: list[Located] = [
            ((*where, k if isinstance(k, str) else repr(k)), "unknown key")
            for k in value
            if k not in PIPELINE_KEYS
        ]
        parts: dict[str, Any] = {}
        if "name" not in value:
            problems.append(((*where, "name"), "required"))
        else:
            name_type = msgspec.structs.fields(PipelineConfig)[0].type
            try:
                parts["name"] = msgspec.convert(value["name"], name_type)
            except msgspec.ValidationError as exc:
                problems.append(((*where, "name"), locate(exc)[1]))
        kinds: dict[str, Any] = {"model": ModelConfig, "results": ResultsConfig}
        for key in ("model", "source", "results", "cascade"):
            if key not in value or (key == "cascade" and value[key] is None):
                continue
            kind = kinds.get(key, CascadeConfig)
            if key == "source":
                kind = self.source_kind(value[key])
                if isinstance(kind, str):
                    problems.append(((*where, "source", "type"), kind))
                    continue
            found = self._entry((*where, key), key, kind, value[key])
            if isinstance(found, list):
                problems += found
            else:
                parts[key] = found
        return problems or PipelineConfig(**parts)

    def pipelines(self, value: Any) -> tuple[PipelineConfig, ...] | list[Located]:
        """The ``pipelines`` list, entry by entry, or the problems of every entry (then
        the first rule between them broken)."""
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_PIPELINES:
            return [(("pipelines",), f"must be a list of 1 to {MAX_PIPELINES} pipelines")]
        found = [self._pipeline(index, item) for index, item in enumerate(value)]
        problems = [problem for item in found if isinstance(item, list) for problem in item]
        if problems:
            return problems
        pipelines = tuple(item for item in found if isinstance(item, PipelineConfig))
        return pipeline_problems(pipelines)[:1] or pipelines


def between_pipelines(data: Mapping[str, Any], sections: Mapping[str, Any]) -> list[Located]:
    """``pipelines`` excludes the single-model keys (as set in ``data``); a top-level
    cascade's model is not the model itself."""
    if "pipelines" in sections:
        both = [key for key in EXCLUSIVE if key in data]
        if both:
            return [
                (
                    ("pipelines",),
                    f"set either pipelines or model/source/results/cascade, not both "
                    f"({', '.join(both)} set too): move them into a pipeline",
                )
            ]
        return []
    cascade = sections.get("cascade")
    if cascade is None:
        return []
    model = sections.get("model", ModelConfig())
    legacy = PipelineConfig(name="main", model=model, cascade=cascade)
    return [(path[2:], message) for path, message in cascade_problems(legacy, ("", 0))]
