"""OpenCV captures: a V4L2 camera, a video file and an RTSP stream.

The three differ only in how the capture opens and in what a failed read means, so
they share ``_CaptureSource``. ``cv2`` is imported when a source opens, not before.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent.sources.base import EndOfStream, SourceError, redact_url

if TYPE_CHECKING:
    import cv2
    import numpy as np

    from agent.config import CameraSource as CameraConfig
    from agent.config import RtspSource as RtspConfig
    from agent.config import VideoSource as VideoConfig

# OpenCV's V4L2 backend waits this long for a frame from a stalled camera (its default
# is 10 s, and it has no CAP_PROP_READ_TIMEOUT_MSEC). It reads the variable once, at
# the first capture of the process.
V4L2_STALL_S = "2"


class _CaptureSource:
    """A ``cv2.VideoCapture`` that yields RGB ``uint8`` frames ``[height, width, 3]``.

    Subclasses say how the capture opens (``_capture``), why it may have failed to
    (``_open_failure``) and what a failed read means (``_read_failed``).
    """

    name: str
    live: bool
    target: str  # what every error names: the device, file or URL

    def __init__(self) -> None:
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        """Open (or reopen) the capture. Raises SourceError naming the target."""
        self.close()
        cap = self._capture()
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name} {self.target}: {self._open_failure()}")
        self._cap = cap

    def read(self, timeout: float) -> np.ndarray:
        """The next frame. OpenCV reads block: each subclass says for how long at most.

        Raises SourceError when not open or the capture fails (EndOfStream: video).
        """
        import cv2

        if self._cap is None:
            raise SourceError(f"{self.name} {self.target}: not open")
        ok, frame = self._cap.read()
        if not ok:
            frame = self._read_failed()
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _capture(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _open_failure(self) -> str:
        return "OpenCV cannot open it"

    def _read_failed(self) -> np.ndarray:
        raise SourceError(f"{self.name} {self.target}: no frame (stream lost)")


class CameraSource(_CaptureSource):
    """A V4L2 camera: a device path (``/dev/video0``) or an index (``"0"``).

    Width, height and ``fps`` are requested when set; the driver may pick the nearest
    mode it has. A read blocks until the next frame, at most ~2 s for a stalled camera
    (``V4L2_STALL_S``), then raises SourceError.
    """

    name = "camera"
    live = True

    def __init__(self, config: CameraConfig) -> None:
        super().__init__()
        self.device = config.device
        self.index = int(config.device) if config.device.isdigit() else None
        self.path = config.device if self.index is None else f"/dev/video{self.index}"
        self.target = self.path if self.index is None else f"{self.index} ({self.path})"
        self.width, self.height, self.fps = config.width, config.height, config.fps

    def _capture(self) -> cv2.VideoCapture:
        import cv2

        os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", V4L2_STALL_S)
        cap = cv2.VideoCapture(self.device if self.index is None else self.index, cv2.CAP_V4L2)
        if cap.isOpened():
            if self.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            if self.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        return cap

    def _open_failure(self) -> str:
        # OpenCV gives no reason; the device node usually tells.
        if not os.path.exists(self.path):
            return "no such device (is the camera plugged in?)"
        if not os.access(self.path, os.R_OK | os.W_OK):
            return "no permission (is the user in the 'video' group?)"
        return "cannot open it (busy in another program, or not a capture device)"

    def _read_failed(self) -> np.ndarray:
        raise SourceError(f"camera {self.target}: no frame (unplugged or stalled?)")


class VideoSource(_CaptureSource):
    """A video file, read as fast as asked (the pipeline paces it to ``fps``).

    At the end: EndOfStream, or with ``loop`` the file opens again from its start.
    """

    name = "video"
    live = False

    def __init__(self, config: VideoConfig) -> None:
        super().__init__()
        self.path = config.path
        self.loop = config.loop
        self.target = str(config.path)

    def _capture(self) -> cv2.VideoCapture:
        import cv2

        return cv2.VideoCapture(str(self.path))

    def _open_failure(self) -> str:
        if not self.path.is_file():
            return "no such file"
        return "not a video OpenCV can read"

    def _read_failed(self) -> np.ndarray:
        # OpenCV reports the end of a file and a damaged one alike: both end the pass.
        if not self.loop:
            raise EndOfStream
        self.open()  # reopening works for every container, seeking not always
        assert self._cap is not None
        ok, frame = self._cap.read()
        if not ok:
            raise SourceError(f"video {self.target}: no frame at the start of the file")
        return frame


class RtspSource(_CaptureSource):
    """An RTSP stream through OpenCV's FFmpeg, over TCP or UDP (``transport``).

    Opening and each read give up after ``timeout_s`` (raising SourceError), so a read
    of a stalled stream blocks up to ``timeout_s``, whatever ``timeout`` it was given.
    """

    name = "rtsp"
    live = True

    def __init__(self, config: RtspConfig) -> None:
        super().__init__()
        self.url = config.url
        self.target = redact_url(config.url)
        self.transport = config.transport
        self.timeout_ms = int(config.timeout_s * 1000)

    def _capture(self) -> cv2.VideoCapture:
        import cv2

        params = []
        for prop in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
            if hasattr(cv2, prop):  # OpenCV >= 4.5.2
                params += [getattr(cv2, prop), self.timeout_ms]
        # OpenCV's FFmpeg reads its options from the environment when a capture opens;
        # ours go last so they win, and the variable is put back for other captures.
        variable = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
        before = os.environ.get(variable)
        os.environ[variable] = "|".join(filter(None, [before, f"rtsp_transport;{self.transport}"]))
        try:
            return cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        finally:
            if before is None:
                del os.environ[variable]
            else:
                os.environ[variable] = before

    def _open_failure(self) -> str:
        return (
            f"cannot open the stream (refused, unreachable, or no answer within "
            f"{self.timeout_ms / 1000:g} s; OpenCV's log says which)"
        )

    def _read_failed(self) -> np.ndarray:
        raise SourceError(
            f"rtsp {self.target}: no frame within {self.timeout_ms / 1000:g} s (stream lost)"
        )
