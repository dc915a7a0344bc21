"""SHA-256 of a download computed beside the loop that receives and writes it.

hashlib releases the GIL while it hashes more than 2 047 bytes, so a helper thread
hashes one chunk while the download loop receives and writes the next: on two cores
the hash (the slowest step per byte) no longer adds to the transfer time. The chunks
are hashed in the order given, and at most ``depth`` wait at a time (memory bounded).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType

HASH_DEPTH = 2  # chunks handed over but not yet hashed, at most


class BackgroundSha256:
    """A sha256 fed chunk by chunk; the hashing runs on a helper thread.

    Use it as a context manager (the thread ends when the block does, whatever
    happens in it). ``hexdigest`` waits for every chunk given to be hashed.
    """

    def __init__(self, depth: int = HASH_DEPTH) -> None:
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._closed = False
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        """Hand ``chunk`` over; waits only while ``depth`` chunks wait already (the
        helper always makes progress: hashing a chunk cannot block)."""
        if self._closed:
            raise ValueError("update() after hexdigest() or close()")
        self._chunks.put(chunk)

    def hexdigest(self) -> str:
        """The hex SHA-256 of every chunk given; no more chunks are taken after it."""
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        """End the helper thread once it has hashed what it was given."""
        if not self._closed:
            self._closed = True
            self._chunks.put(None)
            self._thread.join()

    def __enter__(self) -> BackgroundSha256:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
