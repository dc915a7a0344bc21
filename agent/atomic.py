"""Durable file operations: what survives a power cut is either the old or the new file.

The pattern (as python-tuf and every careful updater use it): write a temp file in
the destination folder, fsync it, ``os.replace`` it over the target, fsync the folder
so the rename itself is on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agent.faults import crash_point


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to disk (the data, before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, crash_tag: str = "") -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    A crash at any point leaves either the old file or the new one, never a mix.
    Raises OSError (for example ENOSPC); no temp file is left behind then.
    ``crash_tag`` names the crash points ``<tag>_written`` and ``<tag>_replaced``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if crash_tag:
            crash_point(f"{crash_tag}_written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if crash_tag:
        crash_point(f"{crash_tag}_replaced")
    fsync_dir(path.parent)
