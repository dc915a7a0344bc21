"""``ShadowUnit``: what one served model needs of agent/shadow/, in one object for the
service (or a per-model unit) to hold: its output statistics, its shadow controller,
the pipeline observers of both, and their parts of the state and telemetry documents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.shadow.control import Event, Load, Shadows
from agent.shadow.outputs import OutputStats

if TYPE_CHECKING:
    from agent.config import Config
    from agent.contract import ShadowDoc, TelemetryExtra
    from agent.frames import Observer
    from agent.mqtt import Incoming
    from agent.store import Release
    from agent.update.worker import Updates


def stage_candidate(updates: Updates, model: str, version: int) -> Release | None:
    """Download and verify the candidate into the model's store (never activated), but
    not while an update of the model is under way: the download holds the store's lock
    for its whole length, and a rollback (probation failing) could not take it then.
    Checked holding that lock (the stage's first phase), so no update can start its
    own stage meanwhile. Busy: a transient StoreError (tried again, then ``failed``)."""
    from agent.contract import UPDATE_PHASES
    from agent.errors import StoreError

    def check(phase: str) -> None:
        busy = updates.phase()
        if busy in UPDATE_PHASES:
            raise StoreError(f"an update of {model} is under way ({busy}); the candidate waits")

    return updates.steps.stage(model, version, allow_downgrade=True, on_phase=check)


class Observed(Protocol):
    """Where the model serves: a pipeline, or the slot that starts one."""

    def set_observers(self, observers: tuple[Observer, ...]) -> None: ...


class ShadowUnit:
    """Output statistics of ``model`` (when known) and its shadow runs."""

    def __init__(
        self,
        config: Config,
        model: str | None,
        store_dir: Path,
        *,
        updates: Callable[[], Updates],
        load: Load,
        event: Event,
        pipeline: Callable[[], Observed | None],
    ) -> None:
        """``updates``: the model's update worker (its stage step, its entry point for
        an update now, its state); ``pipeline``: the one that serves ``model`` now."""
        from agent.verify import KeyRing

        self.outputs = OutputStats(model or "", store_dir)
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._runs: tuple[Observer, ...] = ()
        self.shadows: Shadows | None = None
        if model is None:
            return
        self.shadows = Shadows(
            model,
            prefix=config.mqtt.topic_prefix,
            device=config.device.id,
            groups=list(config.device.groups),
            stage=lambda m, v: stage_candidate(updates(), m, v),
            load=load,
            attach=self._attach,
            promote=lambda m, v, at: updates().request_update(m, v, "shadow", at),
            event=event,
            changed=lambda: updates().publish_state(),
            key=KeyRing.load(config.update.desired_keys, "update.desired_public_key(s)"),
            max_skew_s=config.update.max_clock_skew_s,
        )

    @property
    def topics(self) -> list[str]:
        """The shadow topics to subscribe to (the device's and its groups')."""
        return list(self.shadows.topics) if self.shadows is not None else []

    def on_message(self, message: Incoming) -> None:
        if self.shadows is not None:
            self.shadows.on_message(message)

    def observers(self) -> tuple[Observer, ...]:
        """What the model's pipeline hands every result to (set it on a new pipeline)."""
        with self._lock:
            return (self.outputs, *self._runs)

    def _attach(self, runs: tuple[Observer, ...]) -> None:
        with self._lock:
            self._runs = runs
        pipeline = self._pipeline()  # read after the runs are set: a new one takes them
        if pipeline is not None:
            pipeline.set_observers(self.observers())

    def start(self) -> None:
        if self.shadows is not None:
            self.shadows.start()

    def stop(self) -> None:
        """Detach and close a shadow run, save the output statistics."""
        if self.shadows is not None:
            self.shadows.stop()
        self.outputs.save()

    def state(self) -> dict[str, ShadowDoc]:
        """The state's ``shadows``: empty while no run was asked for."""
        doc = self.shadows.doc() if self.shadows is not None else None
        return {doc["model"]: doc} if doc else {}

    def telemetry(self) -> TelemetryExtra:
        """Telemetry's ``shadows`` and ``outputs``, each when there is something."""
        extra: TelemetryExtra = {}
        shadows = self.state()
        if shadows:
            extra["shadows"] = shadows
        outputs = self.outputs.doc()
        if outputs is not None:
            extra["outputs"] = {self.outputs.model: outputs}
        return extra
