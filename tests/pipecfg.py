"""The test agents' config shapes with several models, written over an
:class:`~tests.agentproc.AgentProcess`'s single-model config: two pipelines on small
synthetic streams publishing every result, or the single model with a cascade.

One place for what tests/test_pipelines.py, test_pipelines_ops.py, test_metrics.py and
test_review20.py each wrote out. ``agent.settings`` is left as it was (the single shape
``rewrite`` goes on from)."""

from __future__ import annotations

from typing import Any

import yaml

from tests.agentproc import MODEL, AgentProcess

SYNTHETIC = {"type": "synthetic", "width": 64, "height": 48, "fps": 20}
EVERY = {"publish": "every", "min_score": 0.0, "top_k": 1}  # every result, the top one


def pipeline(name: str, model: str, **extra: Any) -> dict[str, Any]:
    """One ``pipelines`` entry on a small synthetic stream, every result published."""
    return {"name": name, "model": {"name": model}, "source": SYNTHETIC, "results": EVERY, **extra}


def write_pipelines(agent: AgentProcess, *pipelines: dict[str, Any]) -> AgentProcess:
    """``agent``'s config with ``pipelines:`` instead of its model, source and results."""
    settings = dict(agent.settings)
    for key in ("model", "source", "results"):
        settings.pop(key)
    settings["pipelines"] = list(pipelines)
    agent.config_path.write_text(yaml.safe_dump(settings))
    return agent


def two_pipelines(
    agent: AgentProcess, second: str, *, cascade: dict[str, Any] | None = None
) -> AgentProcess:
    """``door`` on the test model (tests/agentproc.py's MODEL), ``yard`` on ``second``
    (with ``cascade`` as its cascade when given)."""
    yard = pipeline("yard", second, **({"cascade": cascade} if cascade else {}))
    return write_pipelines(agent, pipeline("door", MODEL), yard)


def write_cascade(agent: AgentProcess, model: str, cascade: dict[str, Any]) -> AgentProcess:
    """``agent``'s config as the single ``model`` on the same stream, with a top-level
    ``cascade``."""
    settings = dict(agent.settings)
    settings.update(model={"name": model}, source=SYNTHETIC, results=EVERY, cascade=cascade)
    agent.config_path.write_text(yaml.safe_dump(settings))
    return agent
