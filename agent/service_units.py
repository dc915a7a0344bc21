"""Building a service's per-model parts from its config: each pipeline's cascade stage,
and one ``ModelUnit`` per served model (its store, its targets, its reporter)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.cascade import Cascade
from agent.errors import EdgeAgentError
from agent.stores import store_dirs, unit_config
from agent.units import CascadeSlot, ModelUnit, PipelineSlot, Target

if TYPE_CHECKING:
    from agent.config import Config, ModelConfig
    from agent.contract import EventName, StateDoc
    from agent.store import Store

# a unit's events that carry no model of their own
_NAMED_EVENTS = frozenset({"model_failed", "state_repaired", "rolled_back", "update_error"})


class UnitReporter:
    """A unit's reporter: events as they are (with several models, ``model_failed``,
    ``rolled_back``, ``update_error`` and a store's ``state_repaired`` name the unit's
    model); its state merged into the one state document (with several models, every
    unit's part under ``models``)."""

    def __init__(
        self,
        event: Callable[[EventName, Mapping[str, Any] | None], None],
        publish_state: Callable[[StateDoc], None],
        model: str | None = None,
    ) -> None:
        self._event = event
        self._publish_state = publish_state
        self.model = model

    def event(self, name: EventName, detail: Mapping[str, Any] | None = None) -> None:
        if self.model is not None and name in _NAMED_EVENTS:
            detail = {**(detail or {}), "model": self.model}
        self._event(name, detail)

    def state(self, state: StateDoc) -> None:
        self._publish_state(state)


def build_cascades(slots: list[PipelineSlot]) -> dict[str, CascadeSlot]:
    """Each pipeline's cascade stage (``cascade:``), by pipeline name, without its model
    until the cascade model's unit serves it (results pass through until then)."""
    from agent.cascade_rules import CascadeRules

    cascades: dict[str, CascadeSlot] = {}
    for slot in slots:
        cascade = slot.config.cascade
        if cascade is None or cascade.model.name is None:
            continue
        rules = CascadeRules(
            labels=frozenset(cascade.labels) if cascade.labels else None,
            max_crops=cascade.max_crops,
            min_score=(
                cascade.min_score
                if cascade.min_score is not None
                else slot.config.results.min_score
            ),
            padding=cascade.padding,
            min_size=cascade.min_size,
        )
        cascades[slot.name] = CascadeSlot(
            slot, Cascade(None, rules), cascade.model.name, cascade.top_k
        )
    return cascades


def build_units(
    config: Config,
    store: Store,
    models: Mapping[str, ModelConfig],
    slots: list[PipelineSlot],
    cascades: Mapping[str, CascadeSlot],
    reporter: Callable[[str | None], UnitReporter],
    *,
    multi: bool,
    connected: Callable[[], bool] | None,
) -> list[ModelUnit]:
    """One unit per served model, each with its store; its targets are the pipelines
    whose primary model it is and the cascade stages that name it. The single-model
    shape (not ``multi``): one unit, the root store, the config as it is."""
    if not multi:
        return [
            ModelUnit(config.model.name, config, list(slots), reporter(None), connected=connected)
        ]
    try:
        pointer = store.pointer()
    except EdgeAgentError:
        pointer = None  # damaged: the root unit repairs it at start
    dirs = store_dirs(config.store.dir, pointer.model if pointer else None, list(models))
    units: list[ModelUnit] = []
    for index, (name, model) in enumerate(models.items()):
        targets: list[Target] = [s for s in slots if s.config.model.name == name]
        targets += [c for c in cascades.values() if c.model_name == name]
        results = targets[0].results
        units.append(
            ModelUnit(
                name,
                unit_config(config, model, results, dirs[name]),
                targets,
                reporter(name),
                connected=connected,
                only_model=True,
                not_served=(lambda m: m not in models) if index == 0 else None,
            )
        )
    return units
