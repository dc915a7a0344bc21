"""A folder of still images (``source.type: images``), one frame per file, by name."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent.sources.base import EndOfStream, SourceError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from agent.config import ImagesSource as ImagesConfig

log = logging.getLogger(__name__)

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})


class ImagesSource:
    """The images in ``path`` (.jpg .jpeg .png .bmp, any case), sorted by file name.

    The folder is listed at ``open()``, which raises SourceError when it is missing or
    holds no image. Frames are RGB ``uint8`` ``[height, width, 3]`` (grey and alpha
    images too). After the last image: EndOfStream, or with ``loop`` the first again.
    A file that cannot be read as an image is skipped (logged and counted in
    ``bad_files``): one broken file must not stop, or endlessly restart, the folder.
    """

    name = "images"
    live = False

    def __init__(self, config: ImagesConfig) -> None:
        self.folder = config.path
        self.loop = config.loop
        self.files: list[Path] = []
        self._next = 0
        self._ended = False
        self.bad_files = 0

    def open(self) -> None:
        try:
            entries = sorted(self.folder.iterdir())
        except OSError as exc:
            raise SourceError(f"images {self.folder}: cannot list the folder: {exc}") from exc
        self.files = [p for p in entries if p.suffix.lower() in EXTENSIONS and p.is_file()]
        if not self.files:
            choices = " ".join(sorted(EXTENSIONS))
            raise SourceError(f"images {self.folder}: no image in the folder ({choices})")
        self._next = 0
        self._ended = False

    def read(self, timeout: float) -> np.ndarray | None:
        import cv2

        if not self.files:
            raise SourceError(f"images {self.folder}: not open")
        if self._next >= len(self.files):
            if not self.loop:
                if not self._ended:  # read() may be called again after the end: say it once
                    self._ended = True
                    log.warning(
                        "images source: all %d images of %s done (loop: false); no more frames",
                        len(self.files),
                        self.folder,
                    )
                raise EndOfStream
            self._next = 0
        path = self.files[self._next]
        self._next += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # always 3 channels, 8 bits
        if image is None:
            self.bad_files += 1
            log.warning(
                "images %s: skipping %s: not an image OpenCV can read", self.folder, path.name
            )
            return None
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.files = []
