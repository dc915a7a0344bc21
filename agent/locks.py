"""Holder locks: an flock on a file that names who holds it (``PID ROLE``).

One running agent per state: the agent holds ``<store.dir>/agent.lock`` and
``<telemetry.outbox>.lock`` for as long as it runs; the command line holds the store's
while it changes the store with no agent running. The kernel drops an flock when its
holder dies, so a killed agent never leaves a stale lock behind.

The role inside tells a waiter what it waits for: a command-line pull lets go within
seconds (worth waiting for), a running agent does not (refused at once, with its pid).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Literal

import msgspec

from agent.errors import EdgeAgentError

Role = Literal["agent", "cli"]
POLL_S = 0.1


class Holder(msgspec.Struct, frozen=True):
    """Who holds a lock: ``pid`` 0 when it has not written its pid yet."""

    pid: int
    role: Role | None  # None: not written yet, or a lock file from an older agent

    @property
    def is_agent(self) -> bool:
        return self.role == "agent" or (self.role is None and _runs_agent(self.pid))


class HolderLock:
    """An exclusive flock on ``path`` with ``PID ROLE`` inside; ``what`` names what it
    guards in messages (``the store /var/lib/edge-agent``); failures raise ``error``."""

    def __init__(
        self, path: Path, what: str, role: Role, error: type[EdgeAgentError] = EdgeAgentError
    ) -> None:
        self.path = path
        self.what = what
        self.role = role
        self.error = error
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` while a command line holds it.

        A running agent holding it is refused at once. Raises ``error`` naming the
        holder's pid (and the fix) when it stays taken, or when the lock file cannot be
        opened.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise self.error(f"cannot open the lock {self.path}: {exc.strerror}") from exc
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if holder.is_agent:
                    os.close(fd)
                    raise self.error(
                        f"another agent (pid {holder.pid}) uses {self.what}; stop it first "
                        "(systemctl stop edge-agent)"
                    ) from None
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise self.error(
                        f"{self.what} is in use by another process (pid {holder.pid or '?'}); "
                        "try again when it has finished"
                    ) from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go (a no-op when not held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> Holder | None:
        """Who holds the lock, or None when it is free (or the file is absent, or its
        folder cannot exist: a store under a file holds no agent either)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        finally:
            os.close(fd)
        return None


def _read_holder(fd: int) -> Holder:
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    pid = int(words[0]) if words and words[0].isdigit() and len(words[0]) < 10 else 0
    role: Role | None = None
    if words[1:2] == ["agent"]:
        role = "agent"
    elif words[1:2] == ["cli"]:
        role = "cli"
    return Holder(pid, role)


def _runs_agent(pid: int) -> bool:
    """Whether process ``pid`` is an ``edge-agent run`` (an agent from before roles)."""
    if pid <= 0:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run" in args
