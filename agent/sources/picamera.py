"""The Raspberry Pi camera through libcamera (``source.type: picamera2``).

Only the path without picamera2 (the ImportError) is tested here: picamera2 needs
libcamera and a Pi camera, which a test machine has not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.sources.base import SourceError

if TYPE_CHECKING:
    import numpy as np

    from agent.config import Picamera2Source as Picamera2Config

INSTALL_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
    "(a virtualenv needs --system-site-packages to see it)"
)


class Picamera2Source:
    """Frames of the first Pi camera, RGB ``uint8`` ``[height, width, 3]``.

    ``open()`` raises SourceError when picamera2 is missing (saying how to install it)
    or the camera cannot start. A read blocks until the camera's next frame and raises
    SourceError when the capture fails.
    """

    name = "picamera2"
    live = True

    def __init__(self, config: Picamera2Config) -> None:
        self.size = (config.width, config.height)
        self.fps = config.fps
        self._camera: Any = None

    def open(self) -> None:
        self.close()
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise SourceError(f"picamera2: {INSTALL_HINT}") from exc
        try:
            camera = Picamera2()
        except Exception as exc:  # RuntimeError, IndexError: no camera, or it is busy
            raise SourceError(f"picamera2: cannot open the camera: {exc}") from exc
        try:
            controls = {"FrameRate": self.fps} if self.fps else {}
            camera.configure(
                camera.create_video_configuration(
                    main={"size": self.size, "format": "RGB888"}, controls=controls
                )
            )
            camera.start()
        except Exception as exc:
            camera.close()
            raise SourceError(f"picamera2: cannot start the camera: {exc}") from exc
        self._camera = camera

    def read(self, timeout: float) -> np.ndarray:
        if self._camera is None:
            raise SourceError("picamera2: not open")
        try:
            frame = self._camera.capture_array()
        except Exception as exc:
            raise SourceError(f"picamera2: capture failed: {exc}") from exc
        # libcamera's "RGB888" is stored B, G, R (OpenCV's order): reverse to RGB.
        rgb: np.ndarray = frame[:, :, ::-1].copy()
        return rgb

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            try:
                camera.stop()
            finally:
                camera.close()
