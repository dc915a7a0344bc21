"""Which store each served model uses (pure).

The store root (``store.dir``) keeps the model it holds: the one its ``active.json``
names, or on a fresh store the first pipeline's model (the single ``model.name`` of
the older config shape). Every other model has its own store in
``store.dir/models/<model>/`` (own blobs, pointer, journal, lock). A root that holds a
model no longer served goes to the first model, as a renamed ``model.name`` did before
several pipelines existed (the journal settles the switch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from agent.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    from agent.config import Config, ModelConfig, ResultsConfig

MODELS_DIR = "models"


def store_dirs(root: Path, held: str | None, models: Sequence[str]) -> dict[str, Path]:
    """Each of ``models`` (in order, the first pipeline's first) to its store folder;
    ``held``: the model the root's pointer names (None: a fresh or unreadable root)."""
    if not models:
        return {}
    owner = held if held in models else models[0]
    return {name: root if name == owner else root / MODELS_DIR / name for name in models}


def unit_config(
    config: Config, model: ModelConfig, results: ResultsConfig, store_dir: Path
) -> Config:
    """``config`` as the single-model config of one served model: its model, the results
    its copies load with, its store (the control socket stays where ``config`` has it)."""
    return msgspec.structs.replace(
        config,
        model=model,
        results=results,
        store=msgspec.structs.replace(config.store, dir=store_dir),
        control=msgspec.structs.replace(config.control, socket=config.control_socket),
        pipelines=(),
        cascade=None,
    )


def held_model(config: Config) -> str | None:
    """The model the store root's pointer names (None: fresh, or unreadable)."""
    from agent.store import Store

    try:
        pointer = Store(config.store.dir, config.store.keep).pointer()
    except (EdgeAgentError, OSError):
        return None
    return pointer.model if pointer else None


def model_config(config: Config, name: str | None) -> Config:
    """The config the store commands use for model ``name`` (None: the first
    pipeline's): its store. Raises ConfigError naming the served models."""
    from agent.config_pipelines import served_models

    pipelines = config.pipeline_list()
    models = served_models(pipelines)
    if name is None and not config.pipelines and len(models) <= 1:
        return config  # the single model: the config as it is
    if name is None:
        name = next(iter(models))
    if name not in models:
        served = ", ".join(models) or "none"
        raise ConfigError([f"--model: {name!r} is not served here (served: {served})"])
    if not config.pipelines and len(models) == 1:
        return config
    dirs = store_dirs(config.store.dir, held_model(config), list(models))
    results = next((p.results for p in pipelines if p.model.name == name), pipelines[0].results)
    return unit_config(config, models[name], results, dirs[name])
