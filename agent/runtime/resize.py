"""Resizing frames to a model's input: OpenCV when a source has loaded it, numpy otherwise.

A device that only runs a synthetic, sensor or Pi-camera stream needs no OpenCV (and
the default install, ``edge-agent[litert]``, has none): frames are then resized by
``resize_bilinear``, the same half-pixel bilinear interpolation as OpenCV's
``INTER_LINEAR`` (within one grey level on uint8 frames, two on a few pixels with
OpenCV's aarch64 build), slower (bench/daemon.py's notes in docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

Resize = Callable[[np.ndarray, int, int], np.ndarray]


def _axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices below and above each output pixel centre, and the upper weight."""
    centres = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    centres = np.clip(centres, 0.0, size_in - 1)
    low = np.floor(centres).astype(np.intp)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (centres - low).astype(np.float32)


def resize_bilinear(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """``frame`` ([H, W] or [H, W, C]) resized to ``width`` x ``height``, same dtype.

    Integer frames are rounded and clipped to their dtype's range. Raises ValueError
    for an empty frame or a size below 1.
    """
    if width < 1 or height < 1 or frame.ndim < 2 or 0 in frame.shape[:2]:
        raise ValueError(f"cannot resize a {list(frame.shape)} frame to {width}x{height}")
    y0, y1, wy = _axis(frame.shape[0], height)
    x0, x1, wx = _axis(frame.shape[1], width)
    extra = (1,) * (frame.ndim - 2)  # broadcast the weights over the channels
    wx = wx.reshape((1, width) + extra)
    wy = wy.reshape((height, 1) + extra)
    # Gather the four neighbours in the frame's own dtype, then interpolate in float32:
    # converting only the output-sized corners, not the whole frame, halves the time.
    rows_low, rows_high = frame[y0], frame[y1]
    a, b = rows_low[:, x0].astype(np.float32), rows_low[:, x1].astype(np.float32)
    c, d = rows_high[:, x0].astype(np.float32), rows_high[:, x1].astype(np.float32)
    top = a + (b - a) * wx
    out = top + (c + (d - c) * wx - top) * wy
    if np.issubdtype(frame.dtype, np.integer):
        info = np.iinfo(frame.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    resized: np.ndarray = out.astype(frame.dtype, copy=False)
    return resized


def resizer() -> Resize:
    """OpenCV's resize when a source has imported ``cv2`` already (camera, video, RTSP,
    MJPEG, images), else ``resize_bilinear``.

    OpenCV is never imported for a resize alone: it costs ~17 MB of RSS over numpy,
    more than the whole budget of a synthetic, sensor or Pi-camera device (issue 19).
    Looked up on each call (a dict lookup), so a reload onto a video source gets it."""
    cv2 = sys.modules.get("cv2")
    return resize_bilinear if cv2 is None else _with_opencv(cv2)


@functools.cache
def _with_opencv(cv2: Any) -> Resize:
    def with_opencv(frame: np.ndarray, width: int, height: int) -> np.ndarray:
        resized: Any = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.asarray(resized).reshape((height, width) + frame.shape[2:])

    return with_opencv
