"""What the agent found damaged at start, and what it did: one ``state_repaired`` event.

The journal (``updates.json``), the store's pointer and files (``active.json``,
``tmp/``, ``blobs/``) and the outbox each check themselves when opened; a damaged one is
set aside or removed, never trusted, and the agent carries on. Each repair is one
``Repair`` and one ``state_repaired`` event with the same fields, whichever file it was.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Repair(msgspec.Struct, frozen=True):
    """One repaired file: what was wrong and what was done (one line each)."""

    file: str
    problem: str
    action: str
    kept_as: str | None = None  # the damaged file, moved aside for a look later
    lost: int | Literal["unknown"] | None = None  # messages that could not be carried over

    def to_event(self) -> dict[str, Any]:
        """The ``state_repaired`` event's detail: file, problem, action (+ kept_as, lost)."""
        detail: dict[str, Any] = {"file": self.file, "problem": self.problem, "action": self.action}
        if self.kept_as is not None:
            detail["kept_as"] = self.kept_as
        if self.lost is not None:
            detail["lost"] = self.lost
        return detail

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}; {self.action}"
