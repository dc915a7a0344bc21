"""Shadow runs from the fleet side: the instruction ``edge-fleet deploy --shadow``
publishes, and what ``promote`` reads back from it.

A shadow instruction is retained on ``<prefix>/<device>/shadow/<model>`` (or a
group's, :func:`agent.desired.shadow_topic`) and signed exactly like a desired state
(:func:`agent.desired.sign_desired`: ``target``, ``keyid``, ``signature`` over
:func:`agent.desired.canonical`), so a device checks it with the same keys::

    {"schema": 1, "model": M, "version": V, "issued_at": …, "sample_pct": 10,
     "max_cpu_pct": 25, "promote": {"min_agreement": 0.95, "min_frames": 500} | null,
     "target": "device:ID" | "group:NAME", "keyid": …, "signature": …}

An empty retained message stops the run. Pure functions; the CLI is
:mod:`agent.fleet.cli_shadow`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.desired import sign_desired
from agent.fleet.deploy import MAX_AHEAD_S
from agent.shadow.instruction import DEFAULT_MAX_CPU_PCT as DEFAULT_MAX_CPU_PCT
from agent.shadow.instruction import DEFAULT_SAMPLE_PCT as DEFAULT_SAMPLE_PCT
from agent.verify import load_private_key

DEFAULT_MIN_FRAMES = 100  # what a shadow rollout's step waits for on each device


@dataclass(frozen=True)
class Promote:
    """When the device promotes the candidate by itself."""

    min_agreement: float  # 0..1
    min_frames: int  # >= 1

    def to_dict(self) -> dict[str, Any]:
        return {"min_agreement": self.min_agreement, "min_frames": self.min_frames}


def _whole_pct(value: float) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100


def check_options(
    sample_pct: int,
    max_cpu_pct: int,
    promote_at: float | None,
    min_frames: int | None,
    *,
    paired: bool = True,
) -> list[str]:
    """One line per unusable option (``--sample``, ``--max-cpu``, ``--promote-at``,
    ``--min-frames``), naming it and the range it takes; [] when all are fine.
    ``paired``: ``--promote-at`` and ``--min-frames`` go together (a device's own
    promotion rule needs both; a shadow rollout has a default for the frames)."""
    problems = []
    if not _whole_pct(sample_pct):
        problems.append(f"--sample: {sample_pct!r} is not a whole percentage from 1 to 100")
    if not _whole_pct(max_cpu_pct):
        problems.append(f"--max-cpu: {max_cpu_pct!r} is not a whole percentage from 1 to 100")
    if promote_at is not None and not (math.isfinite(promote_at) and 0 < promote_at <= 1):
        problems.append(f"--promote-at: {promote_at:g} is not an agreement above 0, at most 1")
    if min_frames is not None and min_frames < 1:
        problems.append(f"--min-frames: {min_frames} is not a positive number of frames")
    if paired and (promote_at is None) != (min_frames is None):
        problems.append("--promote-at and --min-frames go together (or neither)")
    return problems


def shadow_payload(
    model: str,
    version: int,
    target: str,
    issued_at: float,
    *,
    sample_pct: int = DEFAULT_SAMPLE_PCT,
    max_cpu_pct: int = DEFAULT_MAX_CPU_PCT,
    promote: Promote | None = None,
    sign_key: Path | None = None,
) -> bytes:
    """The shadow instruction (module docstring), signed with ``sign_key`` when given.

    Raises ValueError for options out of range or an ``issued_at`` in the future,
    VerificationError when the key cannot be loaded.
    """
    problems = check_options(
        sample_pct,
        max_cpu_pct,
        promote.min_agreement if promote else None,
        promote.min_frames if promote else None,
    )
    if problems:
        raise ValueError("; ".join(problems))
    if not issued_at <= time.time() + MAX_AHEAD_S:  # also refuses NaN
        raise ValueError(f"issued_at {issued_at!r} is in the future; an instruction is issued now")
    doc: dict[str, Any] = {
        "schema": 1,
        "model": model,
        "version": version,
        "issued_at": issued_at,
        "sample_pct": sample_pct,
        "max_cpu_pct": max_cpu_pct,
        "promote": promote.to_dict() if promote else None,
        "target": target,
    }
    if sign_key is not None:
        doc = sign_desired(doc, load_private_key(sign_key))
    return json.dumps(doc).encode()


def shadow_version(doc: Mapping[str, Any] | None, model: str) -> int | None:
    """The candidate version a retained shadow instruction names for ``model`` (None:
    no instruction, another model, or no usable version)."""
    if not isinstance(doc, Mapping) or doc.get("model") != model:
        return None
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    return None
