"""Durable file operations: what survives a power cut is either the old or the new file.

The pattern (as python-tuf and every careful updater use it): write a temp file in
the destination folder, fsync it, ``os.replace`` it over the target, fsync the folder
so the rename itself is on disk.

Files in folders others may write to (a store's ``tmp/`` and ``blobs/``) are opened
with ``open_private``: never through a symbolic link, and an existing file is reused
only when it is ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.faults import crash_point


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` (never through a link,
    never from a FIFO or device). Raises FileNotFoundError when absent, OSError when
    it is not a regular file, ValueError when longer than ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.EINVAL, "a symbolic link, not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"longer than {limit} bytes")
    return data


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to disk (the data, before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_ours(st: os.stat_result) -> bool:
    """A regular file (not a link, FIFO, device or folder) owned by this process's
    user, with no second name (a hard link elsewhere would be written through)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def open_private(path: Path, mode: int = 0o600) -> int:
    """Open ``path`` to read and write, reusing a file there only when it is ours.

    Never follows a symbolic link at ``path``. An existing file is kept, bytes and all,
    only when ``is_ours``; anything else there (a link, a FIFO, a hard link, another
    user's file) is unlinked, never opened through, and a new file is made (O_EXCL,
    ``mode``). Returns the descriptor. Raises OSError: IsADirectoryError for a folder
    at ``path`` (not removed here), or EAGAIN when the path keeps changing under us.
    """
    for _ in range(3):
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            try:
                return os.open(
                    path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
                )
            except FileExistsError:
                continue  # made by someone else since the lstat: judge it again
        if stat.S_ISDIR(before.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if is_ours(before):  # opened only when it looked like ours: no FIFO, no device
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # swapped for a link since the lstat
                    raise
            else:
                if is_ours(os.fstat(fd)):
                    return fd
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # removes a link itself, never what it points to
    raise OSError(errno.EAGAIN, f"{path} keeps changing while it is opened")


def same_file(fd: int, path: Path) -> bool:
    """``path`` (not followed) is the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, crash_tag: str = "") -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    A crash at any point leaves either the old file or the new one, never a mix.
    Raises OSError (for example ENOSPC); no temp file is left behind then.
    ``crash_tag`` names the crash points ``<tag>_written`` and ``<tag>_replaced``.
    """
    import tempfile  # and shutil, random: not for a command line that only reads

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
