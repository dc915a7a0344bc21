"""The apply steps (stage, validate, activate, roll back) behind a seam.

The worker (``agent.update.worker``) decides; ``Steps`` does. ``DeviceSteps`` is the
production one: the registry (through ``agent.pull``), the store, the service's
serving and validation gate. Tests pass their own ``Steps`` to drive the worker
without a registry, a broker or a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import Config
from agent.errors import EdgeAgentError, ModelError, StoreError, UpdateError
from agent.faults import crash_point
from agent.pull import Updater
from agent.registry import Progress, Registry
from agent.store import Pointer, Release, Store
from agent.update.policy import Failed, classify

if TYPE_CHECKING:
    from agent.manifest import FileEntry
    from agent.pipeline import Stats
    from agent.runtime.model import LoadedModel


class Serving(Protocol):
    """What the service does for the updater: load a release, switch the stream to it."""

    def load(self, release: Release) -> LoadedModel:
        """Load (and warm up) ``release`` beside the running model. Raises ModelError."""
        ...

    def swap(self, model: LoadedModel, timeout: float) -> None:
        """Serve ``model`` from now on (starting the stream if there was none).

        Raises ModelError when it is not taken within ``timeout``; the old one serves on.
        """
        ...

    def stats(self) -> Stats | None: ...


Validate = Callable[[Release, "LoadedModel"], Mapping[str, Any]]
"""The validation gate: raises ValidationError, returns a report for the event."""


class Steps(Protocol):
    """The I/O of an update. Each step raises ``Failed`` (classified by
    ``policy.classify``) or EdgeAgentError as documented, and leaves the store naming
    what serves."""

    def read_channel(self) -> int:
        """The version the model's channel names now. Raises EdgeAgentError."""
        ...

    def poll_channel(self, etag: str | None) -> tuple[int | None, str | None]:
        """The channel's version (None: unchanged since ``etag``) and the new ETag.
        Raises EdgeAgentError."""
        ...

    def stage(
        self,
        model: str,
        version: int,
        *,
        allow_downgrade: bool,
        on_phase: Callable[[str], None],
        progress: Callable[[FileEntry], Progress | None] | None = None,
    ) -> Release | None:
        """Download and verify the release into the store; None when it is the active
        one already. ``progress`` is told about each file's bytes. Raises Failed."""
        ...

    def validate(self, release: Release) -> tuple[LoadedModel, Mapping[str, Any]]:
        """Load the release beside the running one and run its gate: the loaded model
        and the gate's report. Raises Failed (nothing left loaded)."""
        ...

    def activate(self, release: Release, model: LoadedModel, timeout: float) -> None:
        """Make the release active and serve ``model``. Raises Failed (the release
        before is active and serving again, ``model`` closed)."""
        ...

    def serve(self, release: Release) -> None:
        """Load and serve a stored release. Raises EdgeAgentError (nothing changed)."""
        ...

    def roll_back(self, release: Release, *, from_version: int, serve: bool) -> None:
        """Make ``release`` active again (files re-checked), marking ``from_version``
        rolled back; ``serve`` it too unless the caller loads it next. Raises
        EdgeAgentError with the store as it was."""
        ...

    def rollback_command(self, to: int | None) -> tuple[Pointer | None, Release]:
        """The ``rollback`` command: the previous stored release (or ``to``) made
        active and served. Returns what was active before. Raises EdgeAgentError."""
        ...

    def restore(self, before: Pointer | None) -> None:
        """Make ``before`` active again after a step failed unexpectedly, so the store
        never names a release the stream is not serving. Never raises."""
        ...

    def clean_up(self) -> None:
        """Drop releases beyond ``store.keep``. Raises EdgeAgentError, OSError."""
        ...


class DeviceSteps:
    """The real steps: registry, store, the service's model and gate."""

    def __init__(self, config: Config, store: Store, serving: Serving, validate: Validate):
        self.config = config
        self.store = store
        self.serving = serving
        self.gate = validate

    def read_channel(self) -> int:
        registry = Registry.from_config(self.config.registry)
        try:
            return Updater(self.config, self.store, registry).channel_version()
        finally:
            registry.close()

    def poll_channel(self, etag: str | None) -> tuple[int | None, str | None]:
        registry = Registry.from_config(self.config.registry)
        try:
            return Updater(self.config, self.store, registry).poll_channel(etag)
        finally:
            registry.close()

    def stage(
        self,
        model: str,
        version: int,
        *,
        allow_downgrade: bool,
        on_phase: Callable[[str], None],
        progress: Callable[[FileEntry], Progress | None] | None = None,
    ) -> Release | None:
        try:
            registry = Registry.from_config(self.config.registry)
        except UpdateError as exc:  # no registry.url: a desired state cannot be fetched
            raise Failed(str(exc)) from exc
        try:
            updater = Updater(self.config, self.store, registry, progress=progress, model=model)
            staged = updater.stage(version, allow_downgrade=allow_downgrade, on_phase=on_phase)
        except Exception as exc:
            failure = classify("stage", exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            registry.close()
        return None if staged.active else staged.release

    def validate(self, release: Release) -> tuple[LoadedModel, Mapping[str, Any]]:
        try:
            candidate = self.serving.load(release)
        except (EdgeAgentError, MemoryError) as exc:
            failure = classify("load", exc)
            if failure is None:
                raise
            raise failure from exc
        try:
            return candidate, self.gate(release, candidate)
        except BaseException as exc:
            candidate.close()
            failure = classify("validate", exc) if isinstance(exc, Exception) else None
            if failure is None:
                raise
            raise failure from exc

    def activate(self, release: Release, model: LoadedModel, timeout: float) -> None:
        before = self.store.pointer()
        try:
            with self.store.lock():
                self.store.activate(release)
            crash_point("update_activated")
            self.serving.swap(model, timeout)
        except (ModelError, StoreError) as exc:
            model.close()
            self.restore(before)
            failure = classify("activate", exc)
            assert failure is not None
            raise failure from exc

    def serve(self, release: Release) -> None:
        model = self.serving.load(release)
        try:
            self.serving.swap(model, self.config.update.activate_timeout_s)
        except BaseException:
            model.close()
            raise

    def roll_back(self, release: Release, *, from_version: int, serve: bool) -> None:
        before = self.store.pointer()
        try:
            self.store.verify(release)
            with self.store.lock():
                self.store.activate(release, rolled_back_from=from_version)
            if serve:
                self.serve(release)
        except EdgeAgentError:
            self.restore(before)  # the store names what serves: still the new release
            raise

    def rollback_command(self, to: int | None) -> tuple[Pointer | None, Release]:
        before = self.store.pointer()
        with self.store.lock():
            release = self.store.rollback(to)
        try:
            self.serve(release)
        except EdgeAgentError:
            self.restore(before)
            raise
        return before, release

    def clean_up(self) -> None:
        with self.store.lock():
            self.store.gc()

    def restore(self, before: Pointer | None) -> None:
        if before is None:
            return
        release = self.store.release(before.model, before.version)
        if release is not None:
            with contextlib.suppress(StoreError), self.store.lock():
                self.store.activate(release)
