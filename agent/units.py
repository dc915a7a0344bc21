"""One unit per served model, one slot per pipeline: what ``Service`` wires per model.

A :class:`ModelUnit` has the model's store, its lock, its update worker (``Updates``,
with this unit as its ``Serving``: load, swap, stats) and its serving targets: the
pipelines whose primary model it is (:class:`PipelineSlot`). A model served by two
pipelines has one unit: the gate validates one loaded copy, ``swap`` gives it to the
first target and loads a copy for each further one. A cascade model has its unit
(store, worker, desired state, state) too; its targets are the cascade stages of the
pipelines that name it (:class:`CascadeSlot`).

A :class:`Target` is small on purpose: ``swap(model, timeout)``, ``between_frames``,
``stats`` and the ``results`` settings a copy is loaded with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec

from agent.cascade import Cascade
from agent.config import Config, PipelineConfig, ResultsConfig, RuntimeConfig
from agent.control import AgentLock
from agent.errors import EdgeAgentError, ModelError
from agent.oneshot import reloader
from agent.pipeline import PACE_WAIT_S, Pipeline, Result, Stats
from agent.runtime.model import LoadedModel, ModelFiles, load_model
from agent.sources import make_source
from agent.store import Release, Store
from agent.update.worker import Reporter, Updates

if TYPE_CHECKING:
    import numpy as np

    from agent.contract import CascadeFiguresDoc, EventName, ModelStateDoc, StateDoc
    from agent.frames import Observer, Stage

log = logging.getLogger(__name__)


class Target(Protocol):
    """Where a unit's model serves: a pipeline, or a pipeline's cascade stage."""

    results: ResultsConfig  # what a copy of the model is loaded with (top_k, min_score)

    def swap(self, model: LoadedModel, timeout: float) -> None:
        """Serve ``model`` from now on. Raises ModelError when not taken in time."""
        ...

    def between_frames(self, timeout: float = PACE_WAIT_S) -> bool: ...

    def stats(self) -> Stats | None: ...


class PipelineSlot:
    """One ``pipelines`` entry: its stream, started on the first model it is given."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        runtime: RuntimeConfig,
        on_result: Callable[[Result], None],
        on_event: Callable[[EventName, Mapping[str, Any]], None],
    ) -> None:
        self.config = pipeline
        self.name = pipeline.name
        self.results = pipeline.results
        self.runtime = runtime
        self.on_result = on_result
        self.on_event = on_event
        self.pipeline: Pipeline | None = None
        self._stopped = False
        self._stages: tuple[Stage, ...] = ()
        self._observers: tuple[Observer, ...] = ()

    def set_stages(self, stages: tuple[Stage, ...]) -> None:
        """The pipeline's stages (a cascade), now and for a pipeline started later."""
        self._stages = stages
        if self.pipeline is not None:
            self.pipeline.set_stages(stages)

    def set_observers(self, observers: tuple[Observer, ...]) -> None:
        """The pipeline's observers (output statistics, a shadow run), now and later."""
        self._observers = observers
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.set_observers(observers)

    def swap(self, model: LoadedModel, timeout: float) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            cfg, results = self.config, self.results
            if self._stopped:
                model.close()
                raise ModelError(f"pipeline {self.name} is stopped")
            self.pipeline = Pipeline(
                make_source(cfg.source),
                model,
                on_result=self.on_result,
                on_event=self.on_event,
                fps=cfg.source.fps,
                reconnect_max_s=cfg.source.reconnect_max_s,
                invoke_timeout_s=self.runtime.invoke_timeout_ms / 1000.0,
                reload=reloader(
                    self.runtime, results.top_k, results.min_score, results.iou_threshold
                ),
            )
            self.pipeline.set_stages(self._stages)
            self.pipeline.set_observers(self._observers)
            self.pipeline.start()
            return
        if not pipeline.swap(model, timeout) and pipeline.withdraw(model):
            raise ModelError(f"the pipeline did not take the new model within {timeout:g} s")

    def between_frames(self, timeout: float = PACE_WAIT_S) -> bool:
        pipeline = self.pipeline
        return pipeline.between_frames(timeout) if pipeline is not None else True

    def stats(self) -> Stats | None:
        pipeline = self.pipeline
        return pipeline.stats() if pipeline is not None else None

    def last_frame(self) -> np.ndarray | None:
        pipeline = self.pipeline
        return pipeline.last_frame() if pipeline is not None else None

    def stop(self) -> None:
        self._stopped = True
        if self.pipeline is not None:
            self.pipeline.stop()


class CascadeSlot:
    """A pipeline's cascade stage as the second model's target: ``swap`` hands the model
    to the stage between frames (and closes the one it replaces once no frame runs on
    it); ``stats`` are the cascade's figures, so probation judges its errors."""

    def __init__(self, slot: PipelineSlot, cascade: Cascade, model: str, top_k: int) -> None:
        self.slot = slot
        self.cascade = cascade
        self.model_name = model
        # a crop's answer: the pipeline's min_score, the cascade's own top_k (32 crops of
        # the pipeline's top_k boxes each would not fit one message)
        self.results = msgspec.structs.replace(slot.results, top_k=top_k)
        slot.set_stages((cascade,))

    def swap(self, model: LoadedModel, timeout: float) -> None:
        old = self.cascade.swap(model, timeout)
        if old is not None:
            old.close()

    def between_frames(self, timeout: float = PACE_WAIT_S) -> bool:
        return self.slot.between_frames(timeout)

    def stats(self) -> Stats | None:
        model = self.cascade.model()
        if model is None:
            return None
        figures = self.cascade.stats()
        return Stats(
            frames=figures.frames,
            results=figures.crops - figures.errors,
            dropped=0,
            errors=figures.errors,
            fps=0.0,
            latency_ms_p50=figures.infer_ms_p50,
            latency_ms_p95=figures.infer_ms_p50,
            latency_ms_p99=figures.infer_ms_p50,
            infer_ms_p50=figures.infer_ms_p50,
            backend=model.backend_name,
            model=model.name,
            version=model.version,
            source_connected=True,
            runtime=model.choice.to_dict(),
        )

    def figures(self) -> CascadeFiguresDoc:
        """Telemetry's ``pipelines.NAME.cascade``."""
        return self.cascade.stats().to_dict(self.model_name)

    def stop(self) -> None:
        self.cascade.close()


class ModelUnit:
    """One served model: store, lock, update worker; the updater's ``Serving``."""

    def __init__(
        self,
        name: str | None,
        config: Config,
        targets: list[Target],
        reporter: Reporter,
        *,
        connected: Callable[[], bool] | None = None,
        only_model: bool = False,
        not_served: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.targets = targets
        self.reporter = reporter
        self.store = Store(config.store.dir, config.store.keep).open()
        self.lock = AgentLock(self.store.root)
        self.updates = Updates(
            config,
            self.store,
            self,
            reporter,
            self._validate,
            connected=connected,
            only_model=only_model,
            not_served=not_served,
        )

    # -- Serving, for the updater -----------------------------------------------------

    def _pace(self) -> Callable[[], object] | None:
        """Load and validate in the gaps between the first serving target's frames."""
        for target in self.targets:
            if target.stats() is not None:
                return target.between_frames
        return None

    def load(self, release: Release) -> LoadedModel:
        results = self.targets[0].results if self.targets else self.config.results
        return self._load(ModelFiles.from_release(release), results)

    def _load(self, files: ModelFiles, results: ResultsConfig) -> LoadedModel:
        return load_model(
            files,
            self.config.runtime,
            results.top_k,
            results.min_score,
            pace=self._pace(),
            iou_threshold=results.iou_threshold,
        )

    def swap(self, model: LoadedModel, timeout: float) -> None:
        """``model`` to the first target, a copy of it to each further one (loaded
        before any switch: a copy that cannot be loaded changes nothing).

        Raises only while nothing serves ``model`` (the caller closes it then): once the
        first target took it, a further target that does not take its copy keeps its
        model, said in the log, and the copy is closed."""
        if not self.targets:  # nothing to serve it (the service gives each unit one)
            model.close()
            return
        copies: list[LoadedModel] = []
        try:
            for target in self.targets[1:]:
                copies.append(self._load(model.files, target.results))
            self.targets[0].swap(model, timeout)
        except BaseException:
            for copy in copies:
                copy.close()
            model.close()
            raise
        for target, copy in zip(self.targets[1:], copies, strict=True):
            try:
                target.swap(copy, timeout)
            except Exception as exc:  # the model serves already: closing it would break that
                copy.close()  # not taken (a target that raises does not serve it)
                log.error(
                    "%s v%s: a further target did not take its copy (it keeps its model): %s",
                    model.name,
                    model.version,
                    exc,
                )

    def stats(self) -> Stats | None:
        for target in self.targets:
            stats = target.stats()
            if stats is not None:
                return stats
        return None

    def _validate(self, release: Release, model: LoadedModel) -> Mapping[str, Any]:
        from agent.validate import validate

        cfg = self.config.update
        report = validate(  # beside a running stream: each invoke in a gap between frames
            release,
            model,
            budget_runs=cfg.budget_runs,
            deadline_s=cfg.validate_timeout_s,
            pace=self._pace(),
        )
        return report.to_dict()

    # -- start --------------------------------------------------------------------------

    def repair(self) -> None:
        """Repair a damaged pointer or planted store files before anything reads them;
        each repair is a ``state_repaired`` event naming the file and what was done."""
        try:
            repairs = self.store.repair()
        except EdgeAgentError as exc:  # busy: the holder repairs on taking the lock
            log.error("%s", exc)
            repairs = self.store.take_repairs()
        for repair in repairs:
            self.reporter.event("state_repaired", repair.to_event())

    def serve_active(self) -> None:
        """Serve the active release (after the gate, for one pulled while the agent was
        stopped), else the ones before it; one that cannot be loaded is reported and the
        unit goes on without serving, reachable by commands and updates."""
        try:
            release = self.store.active()
        except EdgeAgentError as exc:
            log.error("%s", exc)
            self.updates.last_error = str(exc)
            release = None
        for _ in range(3):
            if release is None:
                break
            try:
                model = self.load(release)
                try:
                    self.updates.gate(release, model)
                except BaseException:
                    model.close()
                    raise
                self.swap(model, self.config.update.activate_timeout_s)
                break
            except EdgeAgentError as exc:
                log.error("cannot serve %s v%d: %s", release.model, release.version, exc)
                self.updates.last_error = f"v{release.version}: {exc}"
                self.reporter.event("model_failed", {"version": release.version, "error": str(exc)})
                release = self.updates.fall_back(f"cannot be loaded at start: {exc}")


MODEL_BAD_MAX = 16  # state's models[M].bad: the latest marks
MODEL_ERROR_MAX = 1000  # state's models[M].last_error: characters

_MODEL_FIELDS = (
    "model",
    "version",
    "sha256",
    "backend",
    "serving",
    "previous",
    "phase",
    "last_error",
    "update",
    "desired",
    "bad",
)


def compose_state(
    first: StateDoc, parts: Mapping[str, StateDoc], pipelines: Sequence[PipelineConfig]
) -> StateDoc:
    """The one ``state`` of several models (pure): ``first`` (the first pipeline's
    model's) as the top-level fields, each model's part under ``models``, and what each
    pipeline runs under ``pipelines``."""
    models: dict[str, ModelStateDoc] = {}
    for name, part in parts.items():
        doc: dict[str, Any] = {key: part[key] for key in _MODEL_FIELDS}  # type: ignore[literal-required]
        doc["runtime"] = part.get("runtime")
        # bounded, so that 16 models' parts fit one message (the top level keeps all)
        doc["bad"] = list(part["bad"])[-MODEL_BAD_MAX:]
        error = part["last_error"]
        if error is not None and len(error) > MODEL_ERROR_MAX:
            doc["last_error"] = error[: MODEL_ERROR_MAX - 1] + "…"
        models[name] = cast("ModelStateDoc", doc)
    return {
        **first,
        "models": models,
        "pipelines": {
            p.name: {
                "model": p.model.name or "",
                "cascade": p.cascade.model.name if p.cascade else None,
                "source": p.source.type,
            }
            for p in pipelines
        },
    }
