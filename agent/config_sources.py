"""The ``source`` section: one struct per kind of source, picked by ``source.type``.

``SOURCES`` maps each ``type`` to its struct (the loader looks the kind up there, then
validates the section against that struct alone, so a key of another kind is refused
as unknown). Conventions as in :mod:`agent.config_sections`.
"""

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from agent.config_sections import FilePath, Section, field_url


class _Source(Section, frozen=True):
    fps: Annotated[
        float,
        Meta(
            ge=0,
            description="Frames per second. Files and synthetic frames are paced to it (0: as "
            "fast as inference takes them); cameras are asked for it; network streams and "
            "sensors keep their own pace.",
        ),
    ] = 15
    reconnect_max_s: Annotated[
        float, Meta(gt=0, description="Longest wait between reconnection attempts.")
    ] = 30


class CameraSource(_Source, frozen=True):
    type: Annotated[
        Literal["camera"], Meta(description="A V4L2 camera (/dev/videoN) through OpenCV.")
    ] = "camera"
    device: Annotated[
        str, Meta(min_length=1, description="V4L2 device path or index (0, 1, …).")
    ] = "/dev/video0"
    width: Annotated[
        Annotated[int, Meta(gt=0)] | None, Meta(description="Requested capture width.")
    ] = None
    height: Annotated[
        Annotated[int, Meta(gt=0)] | None, Meta(description="Requested capture height.")
    ] = None


class VideoSource(_Source, frozen=True, kw_only=True):
    type: Annotated[Literal["video"], Meta(description="A video file through OpenCV.")] = "video"
    path: Annotated[FilePath, Meta(description="Video file.")]
    loop: Annotated[bool, Meta(description="Start again at the end of the file.")] = False


class _StreamSource(_Source, frozen=True, kw_only=True):
    schemes: ClassVar[tuple[str, ...]] = ()
    url: Annotated[str, Meta(description="Stream URL.")]
    timeout_s: Annotated[float, Meta(gt=0, description="Connect and read timeout.")] = 10

    def __post_init__(self) -> None:
        field_url("url", self.url, self.schemes)


class MjpegSource(_StreamSource, frozen=True, kw_only=True):
    """An HTTP multipart MJPEG stream."""

    schemes = ("http", "https")
    type: Annotated[
        Literal["mjpeg"],
        Meta(description="An HTTP multipart MJPEG stream (Basic auth from the URL)."),
    ] = "mjpeg"


class RtspSource(_StreamSource, frozen=True, kw_only=True):
    """An RTSP stream."""

    schemes = ("rtsp", "rtsps")
    type: Annotated[
        Literal["rtsp"], Meta(description="An RTSP stream through OpenCV's FFmpeg.")
    ] = "rtsp"
    transport: Annotated[Literal["tcp", "udp"], Meta(description="RTP transport.")] = "tcp"


class ImagesSource(_Source, frozen=True, kw_only=True):
    type: Annotated[
        Literal["images"], Meta(description="A folder of still images, read in name order.")
    ] = "images"
    path: Annotated[
        FilePath, Meta(description="Folder of images (.jpg, .jpeg, .png, .bmp), by name.")
    ]
    loop: Annotated[bool, Meta(description="Start again after the last image.")] = False


class Picamera2Source(_Source, frozen=True):
    type: Annotated[
        Literal["picamera2"], Meta(description="The Raspberry Pi camera through picamera2.")
    ] = "picamera2"
    width: Annotated[int, Meta(gt=0, description="Capture width.")] = 640
    height: Annotated[int, Meta(gt=0, description="Capture height.")] = 480


class _SensorSource(_Source, frozen=True):
    window: Annotated[int, Meta(ge=1, le=1_000_000, description="Samples per inference.")] = 32
    hop: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Samples between windows; default: the window size."),
    ] = None
    channels: Annotated[int, Meta(ge=1, le=4096, description="Values per sample.")] = 1
    fps: Annotated[float, Meta(ge=0, description="Unused for sensors: samples pace them.")] = 0


class SerialSource(_SensorSource, frozen=True):
    type: Annotated[
        Literal["serial"],
        Meta(description="A serial sensor: one sample of numbers per line."),
    ] = "serial"
    device: Annotated[str, Meta(min_length=1, description="Serial device.")] = "/dev/ttyUSB0"
    baudrate: Annotated[int, Meta(gt=0, description="Serial baud rate.")] = 115200


class UdpSource(_SensorSource, frozen=True, kw_only=True):
    type: Annotated[
        Literal["udp"],
        Meta(description='A UDP sensor: JSON numbers, lists or {"values": […]} per datagram.'),
    ] = "udp"
    port: Annotated[
        int, Meta(ge=1, le=65535, description="UDP port receiving JSON-lines datagrams.")
    ]
    bind: Annotated[str, Meta(min_length=1, description="Address to listen on.")] = "0.0.0.0"


class SyntheticSource(_Source, frozen=True):
    type: Annotated[
        Literal["synthetic"],
        Meta(description="A generated moving test pattern (no hardware)."),
    ] = "synthetic"
    width: Annotated[int, Meta(gt=0, le=8192, description="Frame width.")] = 320
    height: Annotated[int, Meta(gt=0, le=8192, description="Frame height.")] = 240
    frames: Annotated[int, Meta(ge=0, description="Frames to produce; 0 means endless.")] = 0


SourceConfig = (
    CameraSource
    | VideoSource
    | MjpegSource
    | RtspSource
    | ImagesSource
    | Picamera2Source
    | SerialSource
    | UdpSource
    | SyntheticSource
)


def _type_of(kind: type[msgspec.Struct]) -> str:
    """The default of ``kind``'s ``type`` field. Read from the struct's own tables (the
    defaults belong to the last fields, as ``msgspec.structs.fields`` pairs them), which
    resolves no annotations: that would take milliseconds of every command's start."""
    names, defaults = kind.__struct_fields__, kind.__struct_defaults__
    tag = defaults[names.index("type") - (len(names) - len(defaults))]
    assert isinstance(tag, str)
    return tag


# Each kind of source by its ``type``, in the order the reference lists them.
SOURCES: dict[str, type[SourceConfig]] = {
    _type_of(kind): kind
    for kind in (
        CameraSource,
        VideoSource,
        MjpegSource,
        RtspSource,
        ImagesSource,
        Picamera2Source,
        SerialSource,
        UdpSource,
        SyntheticSource,
    )
}
SOURCE_TYPES = tuple(SOURCES)
