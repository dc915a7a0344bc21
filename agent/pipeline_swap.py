"""The hand-over of models in a pipeline: the one serving, the one handed to ``swap``
and not yet taken, and the switched-out ones waiting to be closed.

The inference thread switches to the pending model between two frames
(``switch_if_pending``); with several interpreters a switched-out model drains first
(frames in flight still run on it) and is retired once the pool is done with it. A
retired model is closed by the thread that called ``swap`` (``close_retired``), never
by the inference thread: freeing an interpreter holds the GIL for a few ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.runtime.model import LoadedModel


class Handover:
    """The models of one pipeline, under one condition that swap() waits on."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model  # serving
        self.pending: LoadedModel | None = None  # handed to swap(), not yet serving
        self._swapped = threading.Condition()
        self._retired: list[LoadedModel] = []  # switched out, closed by swap()'s caller
        # Switched out while frames still run on its interpreters (runtime.interpreters
        # > 1): retired once the last of them is done.
        self._draining: list[LoadedModel] = []

    def newest(self) -> LoadedModel:
        """The model frames from now on go to: the pending one, else the serving one."""
        return self.pending or self.model

    def offer(
        self,
        model: LoadedModel,
        timeout: float,
        running: Callable[[], bool],
        stop: threading.Event,
    ) -> bool:
        """Hand ``model`` to the inference thread; True once it serves it (see
        ``Pipeline.swap``). Not ``running``: it serves at once."""
        with self._swapped:
            if self.pending is not None:
                self.pending.close()
                self.pending = None
            if stop.is_set():
                model.close()
                return False
            if not running():  # not running: switch now
                old, self.model = self.model, model
                old.close()
                return True
            self.pending = model
            deadline = time.monotonic() + timeout
            taken = (
                self._swapped.wait_for(lambda: self.pending is not model or stop.is_set(), timeout)
                and self.model is model
            )
            if taken:  # several interpreters: the frames in flight on the old set end first
                self._swapped.wait_for(
                    lambda: not self._draining or stop.is_set(),
                    max(0.0, deadline - time.monotonic()),
                )
        self.close_retired()
        return taken

    def withdraw(self, model: LoadedModel) -> bool:
        """Take back ``model`` if it is still pending (then closed); False when it serves."""
        with self._swapped:
            withdrawn = self.pending is model
            if withdrawn:
                self.pending = None
            serving = self.model is model
        if withdrawn:  # only what was taken back here: a switched-out model is closed by
            model.close()  # swap()'s caller once no frame runs on it
        self.close_retired()
        return not serving

    def switch_if_pending(self, drain: bool = False) -> tuple[LoadedModel, LoadedModel] | None:
        """Serve the pending model from now on; (new, old), or None when none is pending.
        The old one is closed by swap()'s caller; with ``drain`` once the pool is done
        with it (``retire_drained``)."""
        if self.pending is None:
            return None
        with self._swapped:
            new, self.pending = self.pending, None
            if new is None:
                return None
            old, self.model = self.model, new
            (self._draining if drain else self._retired).append(old)
            self._swapped.notify_all()
        return new, old

    def retire_drained(self, uses: Callable[[LoadedModel], bool]) -> None:
        """Hand the switched-out models no frame runs on any more to swap()'s caller."""
        with self._swapped:
            done = [old for old in self._draining if not uses(old)]
            if done:
                self._draining = [old for old in self._draining if uses(old)]
                self._retired += done
                self._swapped.notify_all()

    def retire_all_draining(self) -> None:
        """Stopping: what still drains is retired (closed by stop(), after the workers)."""
        with self._swapped:
            self._retired += self._draining
            self._draining.clear()
            self._swapped.notify_all()  # a swap() waiting for the drain: it is over

    def replace(self, new: LoadedModel, current: Callable[[], bool]) -> bool:
        """Serve ``new`` (a recovered model) if ``current()`` still holds; else close it."""
        with self._swapped:
            if not current():  # a newer recovery took over
                new.close()
                return False
            self.model = new
            return True

    def close_pending(self) -> None:
        """Stopping: close the model handed to swap() and not taken, and wake swap()."""
        with self._swapped:
            pending, self.pending = self.pending, None
            self._swapped.notify_all()
        if pending is not None:
            pending.close()

    def close_retired(self) -> None:
        """Close the switched-out models (in the calling thread)."""
        with self._swapped:
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()
