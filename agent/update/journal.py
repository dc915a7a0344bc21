"""The update journal (``updates.json`` in the store): typed, checked on load.

The journal is what survives a restart: the last attempt and where it stood, the
desired state last applied, the versions marked bad on this device, the unclean starts
counted per release, and whether a desired state pins the device.

``parse`` turns bytes into a ``JournalDoc`` or raises ``JournalDamaged`` naming what is
wrong: every field is checked for its type, so a truncated, garbled or wrong-typed file
never reaches the update logic. ``Journal.load`` does the I/O around it: a damaged file
is kept as ``updates.json.damaged-<ts>`` and a fresh journal starts, with a ``Repair``
the daemon reports as a ``state_repaired`` event. The journal only holds history, so a
fresh one loses nothing the device needs to serve: the active release is the store's.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.atomic import read_bounded, write_atomic
from agent.contract import UPDATE_OUTCOMES, UPDATE_PHASES, UpdateDoc, UpdateOutcome, UpdatePhase
from agent.repairs import Repair

if TYPE_CHECKING:
    from agent.store import Pointer, Release, Store

log = logging.getLogger(__name__)

JOURNAL: Final = "updates.json"
SCHEMA: Final = 1
BAD_MAX: Final = 64
MAX_BYTES: Final = 1 << 20  # a journal is a few kB; anything far larger is not one

Phase = UpdatePhase  # the contract's names, under the journal's old ones
Outcome = UpdateOutcome
PHASES: Final[tuple[Phase, ...]] = UPDATE_PHASES
OUTCOMES: Final[tuple[Outcome, ...]] = UPDATE_OUTCOMES
LOCAL_OFFLINE: Final = "local-offline"  # Attempt.source of a pull made while no agent ran


class JournalDamaged(ValueError):
    """The journal's bytes are not a journal: the message says what is wrong."""


@dataclass
class Attempt:
    """One update, as the journal keeps it."""

    id: str
    model: str
    version: int
    source: str  # device, group:NAME, channel:NAME, local, local-offline
    issued_at: float | None
    previous: tuple[str, int] | None  # the release to go back to
    phase: Phase = "downloading"
    outcome: Outcome | None = None
    reason: str = ""
    transient: bool = False  # a failure worth retrying (the network, an interruption)
    started_at: float = field(default_factory=time.time)
    phase_at: float = field(default_factory=time.time)
    deadline_s: float | None = None  # of the current phase
    probation_until: float | None = None  # wall clock
    starts: int = 0  # unclean agent starts seen during probation
    clean_stop: bool = False

    @classmethod
    def new(
        cls,
        model: str,
        version: int,
        source: str,
        issued_at: float | None,
        previous: tuple[str, int] | None,
    ) -> Attempt:
        return cls(uuid.uuid4().hex[:12], model, version, source, issued_at, previous)

    @property
    def open(self) -> bool:
        """Not ended yet."""
        return self.outcome is None

    def summary(self) -> UpdateDoc:
        """The retained state's ``update`` field."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "source": self.source,
            "issued_at": self.issued_at,
            "phase": self.phase,
            "outcome": self.outcome,
            "reason": self.reason or None,
            "started_at": round(self.started_at, 3),
            "deadline_s": self.deadline_s,
            "retry": self.transient if self.outcome == "failed" else None,
        }


@dataclass(frozen=True)
class BadMark:
    """A version refused on this device: the channel never offers it again."""

    model: str
    version: int
    at: float  # wall clock of the marking: a desired state issued later retries it
    reason: str


@dataclass(frozen=True)
class Applied:
    """The desired state last acted on (done or refused): never redone."""

    model: str
    version: int
    issued_at: float
    source: str

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.model, self.version, self.issued_at)


@dataclass
class JournalDoc:
    """What ``updates.json`` holds (schema 1)."""

    attempt: Attempt | None = None
    applied: Applied | None = None
    bad: list[BadMark] = field(default_factory=list)
    crashes: dict[str, int] = field(default_factory=dict)  # "model@version" -> unclean starts
    pinned: bool = False  # a desired state is in force: the channel is not followed

    def to_bytes(self) -> bytes:
        doc = {
            "schema": SCHEMA,
            "attempt": asdict(self.attempt) if self.attempt else None,
            "applied": asdict(self.applied) if self.applied else None,
            "bad": [asdict(b) for b in self.bad[-BAD_MAX:]],
            "crashes": self.crashes,
            "pinned": self.pinned,
        }
        return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()

    def bad_mark(self, model: str, version: int) -> BadMark | None:
        return next(
            (b for b in reversed(self.bad) if (b.model, b.version) == (model, version)), None
        )

    def mark_bad(self, model: str, version: int, reason: str, at: float) -> None:
        self.unmark(model, version)
        self.bad.append(BadMark(model, version, at, reason))
        del self.bad[:-BAD_MAX]

    def unmark(self, model: str, version: int) -> None:
        self.bad = [b for b in self.bad if (b.model, b.version) != (model, version)]


# -- checking, field by field (pure) ----------------------------------------------------


def _str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise JournalDamaged(f"{where}{key}: must be a string, not {_kind(value)}")
    return value


def _int(doc: dict[str, Any], key: str, where: str, low: int = 0) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise JournalDamaged(f"{where}{key}: must be an integer >= {low}, not {_kind(value)}")
    return value


def _num(doc: dict[str, Any], key: str, where: str, optional: bool = False) -> float | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JournalDamaged(f"{where}{key}: must be a finite number, not {_kind(value)}")
    return float(value)


def _bool(doc: dict[str, Any], key: str, where: str) -> bool:
    value = doc.get(key)
    if not isinstance(value, bool):
        raise JournalDamaged(f"{where}{key}: must be true or false, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return "missing" if value is None else type(value).__name__


def _object(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JournalDamaged(f"{where}: must be an object, not {_kind(value)}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise JournalDamaged(f"{where}: unknown field {unknown[0]!r}")
    return value


def _attempt(value: Any) -> Attempt:
    where = "attempt."
    known = set(Attempt.__dataclass_fields__)
    doc = _object(value, "attempt", known)
    defaults = Attempt("", "", 1, "", None, None)
    merged = {**asdict(defaults), **doc}
    previous = merged["previous"]
    if previous is not None:
        if (
            not isinstance(previous, list)
            or len(previous) != 2
            or not isinstance(previous[0], str)
            or isinstance(previous[1], bool)
            or not isinstance(previous[1], int)
        ):
            raise JournalDamaged(f"{where}previous: must be [model, version] or null")
        previous = (previous[0], previous[1])
    for key in ("id", "model", "version", "source"):
        if key not in doc:
            raise JournalDamaged(f"{where}{key}: missing")
    phase = merged["phase"]
    if phase not in PHASES:
        raise JournalDamaged(f"{where}phase: {phase!r} is not one of {', '.join(PHASES)}")
    outcome = merged["outcome"]
    if outcome is not None and outcome not in OUTCOMES:
        raise JournalDamaged(f"{where}outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
    deadline = _num(merged, "deadline_s", where, optional=True)
    if deadline is not None and deadline < 0:
        raise JournalDamaged(f"{where}deadline_s: must not be negative")
    return Attempt(
        id=_str(merged, "id", where),
        model=_str(merged, "model", where),
        version=_int(merged, "version", where, low=1),
        source=_str(merged, "source", where),
        issued_at=_num(merged, "issued_at", where, optional=True),
        previous=previous,
        phase=phase,
        outcome=outcome,
        reason=_str(merged, "reason", where),
        transient=_bool(merged, "transient", where),
        started_at=_num(merged, "started_at", where) or 0.0,
        phase_at=_num(merged, "phase_at", where) or 0.0,
        deadline_s=deadline,
        probation_until=_num(merged, "probation_until", where, optional=True),
        starts=_int(merged, "starts", where),
        clean_stop=_bool(merged, "clean_stop", where),
    )


def _applied(value: Any) -> Applied:
    doc = _object(value, "applied", {"model", "version", "issued_at", "source"})
    return Applied(
        _str(doc, "model", "applied."),
        _int(doc, "version", "applied.", low=1),
        _num(doc, "issued_at", "applied.") or 0.0,
        _str(doc, "source", "applied."),
    )


def _bad(value: Any) -> list[BadMark]:
    if not isinstance(value, list):
        raise JournalDamaged(f"bad: must be a list, not {_kind(value)}")
    marks = []
    for i, item in enumerate(value[-BAD_MAX:]):
        doc = _object(item, f"bad[{i}]", {"model", "version", "at", "reason"})
        where = f"bad[{i}]."
        marks.append(
            BadMark(
                _str(doc, "model", where),
                _int(doc, "version", where, low=1),
                _num(doc, "at", where) or 0.0,
                _str(doc, "reason", where),
            )
        )
    return marks


def _crashes(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise JournalDamaged(f"crashes: must be an object, not {_kind(value)}")
    return {str(key): _int(value, key, "crashes.") for key in value}


def parse(data: bytes) -> JournalDoc:
    """The journal in ``data``; raises JournalDamaged naming the first thing wrong.

    Pure: no I/O. Nothing but a complete, well-typed schema-1 journal passes.
    """
    if len(data) > MAX_BYTES:
        raise JournalDamaged(f"{len(data)} bytes: far larger than a journal")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise JournalDamaged("not JSON: nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, too many digits
        raise JournalDamaged(f"not JSON: {exc}") from None
    doc = _object(doc, "the journal", {"schema", "attempt", "applied", "bad", "crashes", "pinned"})
    if doc.get("schema") != SCHEMA:
        raise JournalDamaged(f"schema: {doc.get('schema')!r}, this agent reads {SCHEMA}")
    attempt, applied = doc.get("attempt"), doc.get("applied")
    return JournalDoc(
        attempt=None if attempt is None else _attempt(attempt),
        applied=None if applied is None else _applied(applied),
        bad=_bad(doc.get("bad", [])),
        crashes=_crashes(doc.get("crashes", {})),
        pinned=_bool({"pinned": doc.get("pinned", False)}, "pinned", ""),
    )


# -- the file (I/O) ---------------------------------------------------------------------


class Journal:
    """``updates.json``: loaded once, saved atomically after every change."""

    def __init__(self, path: Path, doc: JournalDoc, repair: Repair | None = None) -> None:
        self.path = path
        self.doc = doc
        self.repair = repair

    @classmethod
    def load(cls, path: Path) -> Journal:
        """Read the journal at ``path``; a missing one is empty, a damaged one set aside.

        Never raises for the file's content: a damaged journal is renamed to
        ``updates.json.damaged-<ts>`` (kept for a look later), a fresh one starts, and
        ``repair`` says what was done.
        """
        try:
            # bounded, never through a link, never blocking on a FIFO planted there
            return cls(path, parse(read_bounded(path, MAX_BYTES)))
        except FileNotFoundError:
            return cls(path, JournalDoc())
        except (OSError, ValueError) as exc:  # JournalDamaged is a ValueError
            problem = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        try:
            path.rename(aside)
            action, kept_as = f"moved aside to {aside.name}; started a new journal", str(aside)
        except OSError as exc:
            action, kept_as = f"cannot move it aside ({exc.strerror}); started a new journal", None
        log.error("%s: damaged (%s): %s", path, problem, action)
        repair = Repair(str(path), problem, action, kept_as)
        return cls(path, JournalDoc(), repair)

    def save(self) -> None:
        """Write the journal; a full disk is logged, never raised (an update or a
        rollback must go on)."""
        try:
            write_atomic(self.path, self.doc.to_bytes())
        except (OSError, ValueError) as exc:
            log.error("cannot write %s: %s", self.path, exc)


def note_offline_pull(store: Store, release: Release, previous: Pointer | None) -> None:
    """Journal an activation by ``edge-agent models pull`` while no agent runs.

    The next start finds it ``validating`` (source ``local-offline``): the agent runs
    the gate before serving it, then probation, and goes back to ``previous`` when
    either fails. Call it before activating, holding the agent lock. A damaged journal
    is set aside first (logged).
    """
    journal = Journal.load(Path(store.root) / JOURNAL)
    attempt = Attempt.new(
        release.model,
        release.version,
        LOCAL_OFFLINE,
        None,
        (previous.model, previous.version) if previous else None,
    )
    attempt.phase, attempt.clean_stop = "validating", True
    journal.doc.attempt = attempt
    journal.save()
