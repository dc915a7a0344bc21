"""Sources of frames and sensor windows, one module per kind, chosen by ``source.type``.

Each class implements ``agent.sources.base.Source`` and takes its own section of the
config. Device libraries (OpenCV, picamera2, pyserial) are imported inside the
sources that need them, so this package imports anywhere.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent.sources.base import EndOfStream, Source, SourceError
from agent.sources.synthetic import MemorySource, pattern_frames

if TYPE_CHECKING:
    from agent.config import SourceConfig

__all__ = ["EndOfStream", "MemorySource", "Source", "SourceError", "make_source", "pattern_frames"]

# source.type -> "module:class"; modules load only when their type is used.
SOURCES = {
    "camera": "agent.sources.opencv:CameraSource",
    "video": "agent.sources.opencv:VideoSource",
    "rtsp": "agent.sources.opencv:RtspSource",
    "mjpeg": "agent.sources.mjpeg:MjpegSource",
    "images": "agent.sources.images:ImagesSource",
    "picamera2": "agent.sources.picamera:Picamera2Source",
    "serial": "agent.sources.sensors:SerialSource",
    "udp": "agent.sources.sensors:UdpSource",
    "synthetic": "agent.sources.synthetic:SyntheticSource",
}


def make_source(config: SourceConfig) -> Source:
    """Build (not open) the source ``config.type`` names."""
    module_name, _, class_name = SOURCES[config.type].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    source: Source = cls(config)
    return source
