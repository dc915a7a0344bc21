"""SHA-256: of bytes, of a file, a file checked against its manifest entry, and of a
download computed beside the loop that receives and writes it.

Light to import: the store uses it on every command line that reads it. Bytes (a
manifest, a pointer: a few kilobytes) are hashed with CPython's own SHA-256 when it has
one (``_sha256``; ``_sha2`` from 3.12), the same digest without loading OpenSSL
(hashlib, hmac: ~2.5 ms of ``edge-agent status``); files and downloads with hashlib,
imported when one is hashed.

hashlib releases the GIL while it hashes more than 2 047 bytes, so a helper thread
hashes one chunk while the download loop receives and writes the next: on two cores
the hash (the slowest step per byte) no longer adds to the transfer time. The chunks
are hashed in the order given, and at most ``depth`` wait at a time (memory bounded).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import TracebackType

from agent.errors import VerificationError

try:  # CPython's own SHA-256: no OpenSSL to load for a small document
    from _sha256 import sha256 as _own_sha256  # type: ignore[import-not-found]
except ImportError:  # 3.12+
    try:
        from _sha2 import sha256 as _own_sha256  # type: ignore[import-not-found]
    except ImportError:  # a build without them: hashlib's
        from hashlib import sha256 as _own_sha256

CHUNK = 1 << 20  # bytes read at a time from a file
HASH_DEPTH = 2  # chunks handed over but not yet hashed, at most


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (a document: hashed by the calling thread)."""
    return str(_own_sha256(data).hexdigest())


def check_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Raise VerificationError unless ``path`` has exactly ``size`` bytes and hash ``sha256``."""
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError as exc:
        raise VerificationError(f"{what}: missing ({path})") from exc
    if actual_size != size:
        raise VerificationError(f"{what}: {actual_size} bytes, manifest says {size}")
    import hmac

    actual = sha256_file(path)
    if not hmac.compare_digest(actual, sha256):
        raise VerificationError(f"{what}: sha256 {actual} does not match manifest {sha256}")


class BackgroundSha256:
    """A sha256 fed chunk by chunk; the hashing runs on a helper thread.

    Use it as a context manager (the thread ends when the block does, whatever
    happens in it). ``hexdigest`` waits for every chunk given to be hashed.
    """

    def __init__(self, depth: int = HASH_DEPTH) -> None:
        import hashlib

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
