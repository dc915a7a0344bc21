"""The fleet's shadow document: a candidate version to run beside the active model.

Retained on ``<prefix>/<device>/shadow/<model>`` and ``<prefix>/groups/<g>/shadow/<model>``
(agent/desired.py's ``shadow_topic``), signed exactly like a desired state (same
``target``, ``keyid``, ``signature``, ``issued_at`` skew rule: :func:`parse_desired` and
:func:`check_clock` check them), with three fields of its own:
``sample_pct`` (1..100, default 10), ``max_cpu_pct`` (1..100, default 25) and
``promote`` (``{"min_agreement": 0..1, "min_frames": N >= 1}`` or null). An empty
retained message stops the shadow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.desired import (
    MAX_PAYLOAD,
    Desired,
    check_clock,
    parse_desired,
    prevailing,
    target_of,
)
from agent.strictjson import parse_object

if TYPE_CHECKING:
    from agent.verify import KeyRing

DEFAULT_SAMPLE_PCT = 10  # whole percentages: any other is refused
DEFAULT_MAX_CPU_PCT = 25


@dataclass(frozen=True)
class Promote:
    min_agreement: float
    min_frames: int


@dataclass(frozen=True)
class ShadowInstruction:
    """One shadow run the fleet asks for, and where it came from (``device``, ``group:G``)."""

    model: str
    version: int
    issued_at: float
    source: str
    sample_pct: int = DEFAULT_SAMPLE_PCT
    max_cpu_pct: int = DEFAULT_MAX_CPU_PCT
    promote: Promote | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """Two instructions with the same key are the same run."""
        return (self.model, self.version, self.issued_at, self.sample_pct, self.max_cpu_pct)


def _pct(doc: dict[str, Any], name: str, default: int) -> int:
    value = doc.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
        raise ValueError(f"{name}: {value!r} is not a whole percentage 1..100")
    return value


def _promote(value: Any) -> Promote | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("promote: must be an object {min_agreement, min_frames} or null")
    share, frames = value.get("min_agreement"), value.get("min_frames")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ValueError(f"promote.min_agreement: {share!r} is not a number 0..1")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"promote.min_frames: {frames!r} is not a positive integer")
    return Promote(float(share), frames)


def parse_shadow(
    payload: bytes,
    source: str,
    device: str,
    *,
    model: str,
    key: KeyRing | None = None,
    now: float | None = None,
    max_skew_s: float | None = None,
) -> ShadowInstruction | None:
    """The instruction in ``payload`` from the shadow topic of ``model`` for ``source``;
    None for an empty (cleared) one. Raises ValueError naming the wrong field."""
    desired = parse_desired(payload, source, target=target_of(source, device), key=key)
    if desired is None:
        return None
    if desired.model != model:
        raise ValueError(f"model: {desired.model!r} is not this topic's model ({model!r})")
    if now is not None and max_skew_s is not None:
        check_clock(desired, now, max_skew_s)
    doc = parse_object(payload, what="shadow instruction", max_bytes=MAX_PAYLOAD)
    return _instruction(desired, doc)


def _instruction(desired: Desired, doc: dict[str, Any]) -> ShadowInstruction:
    return ShadowInstruction(
        desired.model,
        desired.version,
        desired.issued_at,
        desired.source,
        sample_pct=_pct(doc, "sample_pct", DEFAULT_SAMPLE_PCT),
        max_cpu_pct=_pct(doc, "max_cpu_pct", DEFAULT_MAX_CPU_PCT),
        promote=_promote(doc.get("promote")),
    )


def winner(by_source: dict[str, ShadowInstruction]) -> ShadowInstruction | None:
    """The device's own instruction, else its groups' most recently issued one."""
    return prevailing(by_source.values())
