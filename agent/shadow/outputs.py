"""Output statistics per model version: the top score's histogram and the class mix.

``OutputStats`` is a pipeline observer (agent/frames.py): it counts every published
result of one model (a cascade model's: every crop it answered, each as a frame, fed
by agent/cascade.py), per version since that version became active, and keeps the
figures of the version served before the last swap (``previous``) in memory and in
``outputs.json`` in the model's store, so a restart keeps the comparison the fleet
reads as drift (``edge-fleet status --model M``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.atomic import read_bounded, write_atomic
from agent.strictjson import parse_object

if TYPE_CHECKING:
    from agent.contract import OutputsDoc, OutputVersionDoc
    from agent.frames import Item, Result
    from agent.runtime.adapters import Output

log = logging.getLogger(__name__)

BINS = 10
FILE = "outputs.json"
MAX_FILE = 256 * 1024  # outputs.json read back: two versions' figures are far smaller
# Labels kept per version, and their length: a huge or hostile label set stays bounded,
# so 8 pipelines' models (each version and its previous) fit in one telemetry message
# under the broker's 256 KiB (agent/outbox.py's MAX_MESSAGE) beside everything else.
MAX_CLASSES = 100
MAX_LABEL = 64  # characters (longer ones are cut; the fleet cuts keys at 64 too)
LABEL_BYTES = 6 * 1024  # the labels of one version, JSON-encoded (escapes counted)
DRIFT_FLAG = 0.3


def top_score(output: Output) -> float | None:
    """The frame's top score: the best class's or detection's; None for other tasks."""
    if output.classes:
        return max(s for _, _, s in output.classes)
    if output.detections:
        return max(d.score for d in output.detections)
    return None


def labels_of(output: Output) -> set[str]:
    """The labels a frame counts for: the top class, or every detected label."""
    if output.classes:
        return {max(output.classes, key=lambda c: c[2])[1]}
    return {d.label for d in output.detections}


def bin_of(score: float) -> int:
    """The bin of ``score`` in [0,.1), …, [.9,1] (clamped to [0, 1])."""
    if score != score:  # NaN
        return 0
    return min(max(int(score * BINS), 0), BINS - 1)


def is_count(value: Any) -> bool:
    """A count read back from ``outputs.json``: a whole number >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def label_cost(label: str) -> int:
    """The bytes ``label`` takes as a key of ``classes`` (JSON, non-ASCII escaped)."""
    return len(json.dumps(label)) + 1


@dataclass
class VersionStats:
    version: int | None
    frames: int = 0
    scores: list[int] = field(default_factory=lambda: [0] * BINS)
    classes: dict[str, int] = field(default_factory=dict)
    label_bytes: int = field(default=0, compare=False)  # label_cost of the classes kept

    def __post_init__(self) -> None:
        kept: dict[str, int] = {}
        self.label_bytes = 0
        for label, count in self.classes.items():
            if self._room(label[:MAX_LABEL], kept):
                kept[label[:MAX_LABEL]] = count
        self.classes = kept

    def _room(self, label: str, classes: dict[str, int]) -> bool:
        """Whether ``label`` (cut) may be counted in ``classes``; takes its room."""
        if label in classes:
            return True
        if len(classes) >= MAX_CLASSES:
            return False
        cost = label_cost(label)
        if self.label_bytes + cost > LABEL_BYTES:
            return False
        self.label_bytes += cost
        return True

    def add(self, output: Output) -> None:
        self.frames += 1
        score = top_score(output)
        if score is not None:
            self.scores[bin_of(score)] += 1
        for label in labels_of(output):
            label = label[:MAX_LABEL]
            if self._room(label, self.classes):
                self.classes[label] = self.classes.get(label, 0) + 1

    def doc(self) -> OutputVersionDoc:
        return {
            "version": self.version,
            "frames": self.frames,
            "scores": list(self.scores),
            "classes": dict(self.classes),
        }

    @classmethod
    def from_doc(cls, doc: Any) -> VersionStats | None:
        """A version's figures from ``outputs.json``; None when the shape is wrong (a
        count that is negative, a bool or not a whole number too)."""
        if not isinstance(doc, dict):
            return None
        version: Any = doc.get("version")
        frames: Any = doc.get("frames")
        scores: Any = doc.get("scores")
        classes: Any = doc.get("classes")
        ok = (
            (version is None or (isinstance(version, int) and not isinstance(version, bool)))
            and is_count(frames)
            and isinstance(scores, list)
            and len(scores) == BINS
            and all(is_count(n) for n in scores)
            and isinstance(classes, dict)
            and all(isinstance(k, str) and is_count(n) for k, n in classes.items())
        )
        if not ok:
            return None
        return cls(version, frames, list(scores), dict(classes))  # bounded on the way in


class OutputStats:
    """One model's output statistics (an Observer): the current version, the previous."""

    def __init__(self, model: str, store_dir: Path | None = None) -> None:
        self.model = model
        self.path = store_dir / FILE if store_dir is not None else None
        self._lock = threading.Lock()
        self._current: VersionStats | None = None
        self._previous: VersionStats | None = None
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:  # never through a link or from a FIFO planted there, bounded, any bytes
            data = read_bounded(self.path, MAX_FILE)
            doc = parse_object(data, what=FILE, max_bytes=MAX_FILE)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:  # DocumentError is a ValueError
            log.warning("%s: not read (%s); output statistics start afresh", self.path, exc)
            return
        current, previous = doc.get("current"), doc.get("previous")
        self._current = VersionStats.from_doc(current)
        self._previous = VersionStats.from_doc(previous)
        if (current is not None and self._current is None) or (
            previous is not None and self._previous is None
        ):  # one damaged part: neither is trusted
            self._current = self._previous = None
            log.warning(
                "%s: damaged (a version's figures); output statistics start afresh", self.path
            )

    def save(self) -> None:
        """Write ``outputs.json`` (atomically); a failure is logged, never raised."""
        if self.path is None:
            return
        with self._lock:
            doc = {
                "model": self.model,
                "current": self._current.doc() if self._current else None,
                "previous": self._previous.doc() if self._previous else None,
            }
        try:
            write_atomic(self.path, json.dumps(doc).encode())
        except OSError as exc:
            log.warning("%s: not written: %s", self.path, exc)

    def observe(self, item: Item, result: Result) -> None:
        """A published result of the pipeline's own model: one frame."""
        self.add(result.model, result.version, (result.output,))

    def add(self, model: str, version: int | None, outputs: Iterable[Output]) -> None:
        """Count ``outputs`` of ``model`` v``version``, each one as a frame (a cascade
        model's: each crop it answered, agent/cascade.py's ``set_outputs``)."""
        swapped = False
        with self._lock:
            self.model = model
            current = self._current
            if current is None or current.version != version:
                if current is not None and current.frames > 0:
                    self._previous = current
                    swapped = True
                self._current = current = VersionStats(version)
            for output in outputs:
                current.add(output)
        if swapped:
            self.save()

    def doc(self) -> OutputsDoc | None:
        """Telemetry's ``outputs[MODEL]``; None before the first frame."""
        with self._lock:
            if self._current is None:
                return None
            return {
                **self._current.doc(),
                "previous": self._previous.doc() if self._previous else None,
            }
