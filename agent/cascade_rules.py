"""Which crops of a frame a cascade's second model runs on: pure decisions, no I/O.

From the frame's size and the primary model's detections, ``plan_crops`` picks the
detections to crop (``CascadeRules``): those with an allowed label and a score of at
least ``min_score``; each box grown by ``padding`` (a share of its width and height on
each side), clipped to the frame and rounded outwards to whole pixels; a crop under
``min_size`` pixels on either side is skipped; of the rest, the best scores first, at
most ``max_crops`` (the others are counted as over the limit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agent.runtime.adapters import Detection

MAX_CROPS = 32  # the most crops per frame a cascade may be set to


@dataclass(frozen=True)
class CascadeRules:
    """What to crop. ``labels`` None: every label."""

    labels: frozenset[str] | None = None
    max_crops: int = 4
    min_score: float = 0.0
    padding: float = 0.0
    min_size: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_crops <= MAX_CROPS:
            raise ValueError(f"max_crops is {self.max_crops}: it must be 1..{MAX_CROPS}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is {self.min_score}: it must be 0..1")
        if not 0.0 <= self.padding <= 1.0:
            raise ValueError(f"padding is {self.padding}: it must be 0..1")
        if self.min_size < 1:
            raise ValueError(f"min_size is {self.min_size}: it must be at least 1 pixel")
        if self.labels is not None and not isinstance(self.labels, frozenset):
            object.__setattr__(self, "labels", frozenset(self.labels))


@dataclass(frozen=True)
class Crop:
    """One detection to crop: its place in the result's list, and the frame's pixels
    ``[y0:y1, x0:x1]`` to run the second model on."""

    index: int
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Plan:
    crops: tuple[Crop, ...]  # best detection score first
    over_limit: int  # eligible, left out by max_crops
    too_small: int  # eligible, smaller than min_size on a side


def crop_box(
    box: tuple[float, float, float, float], width: int, height: int, padding: float
) -> tuple[int, int, int, int] | None:
    """``box`` (xmin, ymin, xmax, ymax) grown by ``padding`` of its size on each side,
    clipped to a ``width`` × ``height`` frame, rounded outwards: (x0, y0, x1, y1), or
    None for a box that is not finite."""
    if not all(math.isfinite(v) for v in box):
        return None
    xmin, ymin, xmax, ymax = box
    pad_x, pad_y = (xmax - xmin) * padding, (ymax - ymin) * padding
    x0 = min(max(math.floor(xmin - pad_x), 0), width)
    y0 = min(max(math.floor(ymin - pad_y), 0), height)
    x1 = min(max(math.ceil(xmax + pad_x), 0), width)
    y1 = min(max(math.ceil(ymax + pad_y), 0), height)
    return x0, y0, x1, y1


def plan_crops(
    width: int, height: int, detections: Sequence[Detection], rules: CascadeRules
) -> Plan:
    """The crops to run for a ``width`` × ``height`` frame, by ``rules``."""
    eligible: list[Crop] = []
    too_small = 0
    for index, found in enumerate(detections):
        if rules.labels is not None and found.label not in rules.labels:
            continue
        if not found.score >= rules.min_score:  # NaN too
            continue
        bounds = crop_box(found.box, width, height, rules.padding)
        if bounds is None:
            continue
        x0, y0, x1, y1 = bounds
        if x1 - x0 < rules.min_size or y1 - y0 < rules.min_size:
            too_small += 1
            continue
        eligible.append(Crop(index, x0, y0, x1, y1))
    eligible.sort(key=lambda crop: -detections[crop.index].score)  # stable: ties keep order
    chosen = tuple(eligible[: rules.max_crops])
    return Plan(chosen, len(eligible) - len(chosen), too_small)
