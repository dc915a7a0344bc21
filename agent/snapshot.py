"""One frame as a JPEG no larger than a budget, for the ``snapshot`` command.

:func:`attempts` is the rule (pure): the frame's own size at falling qualities, then
half the size, and so on down to :data:`MIN_SIDE` pixels; :func:`encode_jpeg` tries
them in order with OpenCV (imported here, where it is used) and keeps the first that
fits. A frame that fits at none of them is refused (SnapshotError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import EdgeAgentError

if TYPE_CHECKING:
    import numpy as np

QUALITIES = (85, 70, 55, 40)
MIN_SIDE = 32  # pixels: smaller than this shows nothing worth sending
MAX_HALVINGS = 8  # 8192 px (the largest synthetic frame) down to 32


class SnapshotError(EdgeAgentError):
    """No JPEG of the frame fits the budget, or the frame is no image."""


@dataclass(frozen=True)
class Jpeg:
    data: bytes
    width: int
    height: int
    quality: int


def attempts(width: int, height: int) -> list[tuple[int, int, int]]:
    """(width, height, quality) to try, in order: every quality at the full size, then
    at each halving while the shorter side stays at least ``MIN_SIDE`` (the frame's own
    size is always tried, however small)."""
    tries: list[tuple[int, int, int]] = []
    w, h = width, height
    for step in range(MAX_HALVINGS + 1):
        if step and min(w, h) < MIN_SIDE:
            break
        tries += [(w, h, quality) for quality in QUALITIES]
        w, h = w // 2, h // 2
    return tries


def encode_jpeg(frame: np.ndarray, max_bytes: int) -> Jpeg:
    """The first of :func:`attempts` whose JPEG is at most ``max_bytes``.

    ``frame`` is RGB ``uint8`` ``[height, width, 3]`` (or grey ``[height, width]``), as
    image sources give it. Raises SnapshotError for anything else, and when nothing fits.
    """
    import cv2
    import numpy as np

    if frame.dtype != np.uint8 or not (
        frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3))
    ):
        raise SnapshotError(
            f"the source gives no image (a {frame.dtype} array of shape {list(frame.shape)})"
        )
    image = (
        cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if frame.ndim == 3 and frame.shape[2] == 3 else frame
    )
    height, width = frame.shape[:2]
    for w, h, quality in attempts(width, height):
        scaled = (
            image
            if (w, h) == (width, height)
            else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        )
        ok, buffer = cv2.imencode(".jpg", scaled, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and buffer.size <= max_bytes:
            return Jpeg(buffer.tobytes(), w, h, quality)
    raise SnapshotError(
        f"no JPEG of the {width}x{height} frame fits {max_bytes // 1024} KiB, down to "
        f"{MIN_SIDE} pixels at quality {QUALITIES[-1]}; raise privacy.snapshot_max_kb"
    )
