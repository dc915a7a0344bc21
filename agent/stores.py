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

MODELS_DIR = "models"


def store_dirs(root: Path, held: str | None, models: Sequence[str]) -> dict[str, Path]:
    """Each of ``models`` (in order, the first pipeline's first) to its store folder;
    ``held``: the model the root's pointer names (None: a fresh or unreadable root)."""
    if not models:
        return {}
    owner = held if held in models else models[0]
    return {name: root if name == owner else root / MODELS_DIR / name for name in models}
