"""The local control socket: the running agent answers the device's own command line.

``edge-agent run`` listens on a Unix stream socket (``Config.control_socket``: the key
``control.socket``, else ``control.sock`` beside ``store.dir``), mode 0660, so the
agent's user and group may use it. One request per connection, one JSON line each way:

    -> {"command": "status"}
    <- {"command": "status", "ok": true, "result": {...}}
    -> {"command": "rollback", "args": {"version": 1}}
    <- {"command": "rollback", "ok": false, "error": "busy: an update is in progress ..."}

Commands: ``ping``, ``status``, ``rollback`` {version}, ``check-updates`` and ``pull``
{version}; the handlers are the same ones the MQTT commands use. A request is at most
``MAX_BYTES``; reads and writes time out after ``IO_TIMEOUT_S``; a malformed request gets
an error reply and never stops the agent.

``AgentLock`` is held by the running agent on ``<store.dir>/agent.lock`` (``PID agent``
inside), so the command line can tell "the agent runs but its socket does not answer"
from "no agent" before it touches the store itself, and a second agent on the same
store is refused at once (agent.locks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import lazylog
from agent.commands import CommandError, Handler
from agent.errors import DocumentError, EdgeAgentError, StoreError
from agent.locks import HolderLock, Role
from agent.strictjson import dumps, parse_object

if TYPE_CHECKING:
    import socket

log = lazylog.get(__name__)  # logging is imported when a line is logged

MAX_BYTES = 64 * 1024
IO_TIMEOUT_S = 5.0
MODE = 0o660
LOCK_FILE = "agent.lock"


class ControlError(EdgeAgentError):
    """The agent could not be asked (no socket, refused, no answer, a bad answer)."""

    def __init__(self, message: str, *, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent  # nothing listens there: no agent, or one without a socket


# -- the agent's side ---------------------------------------------------------------


class ControlServer:
    """Listens on ``path`` and answers one connection at a time on its own thread."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Bind (replacing a stale socket file nobody answers on), chmod 0660, listen.

        Raises ControlError when another process answers on the path, or it cannot be
        bound (the folder missing or not writable).
        """
        if self.path.is_socket() or self.path.exists():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"control.socket: {self.path} exists and is not a socket")
            if _answers(self.path):
                raise ControlError(
                    f"control.socket: another agent answers on {self.path}; stop it first"
                )
            self.path.unlink(missing_ok=True)  # stale: left by an agent that was killed
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, MODE)  # after bind: whatever the umask (systemd's is 0077)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control.socket: cannot listen on {self.path}: {exc}") from exc
        sock.settimeout(0.2)  # accept() wakes up to see stop()
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket: %s", self.path)

    def stop(self, timeout: float = IO_TIMEOUT_S + 1) -> None:
        """Stop listening and remove the socket file (after the answer being written)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._sock = None

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("control socket: accept failed: %s", exc)
                time.sleep(0.2)
                continue
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                try:
                    try:
                        reply = self.answer(_read_line(conn))
                    except ControlError as exc:  # oversized: say so, drop the rest
                        reply = {"command": None, "ok": False, "error": str(exc)}
                    conn.sendall(dumps(reply).encode() + b"\n")
                except OSError as exc:  # the asker went away, or was slow
                    log.warning("control socket: %s", exc)

    def answer(self, raw: bytes) -> dict[str, Any]:
        """The reply to one request line; never raises."""
        name: Any = None
        try:
            try:
                doc = parse_object(raw, what="request", max_bytes=MAX_BYTES)
            except DocumentError as exc:
                raise CommandError(str(exc)) from None
            name = doc.get("command")
            args = doc.get("args") or {}
            if not isinstance(name, str) or name not in self.handlers:
                known = ", ".join(sorted(self.handlers))
                raise CommandError(f"unknown command {name!r}; known: {known}")
            if not isinstance(args, dict):
                raise CommandError("args must be a JSON object")
            result = dict(self.handlers[name](args))
        except EdgeAgentError as exc:
            log.warning("control command %s refused: %s", name, exc)
            return {"command": name, "ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug: answer, log, keep serving
            log.exception("control command %s failed", name)
            return {"command": name, "ok": False, "error": f"internal error: {exc!r}"}
        return {"command": name, "ok": True, "result": result}


def _read_line(conn: socket.socket, what: str = "request") -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_BYTES:
            raise ControlError(f"{what} larger than {MAX_BYTES} bytes: dropped")
    return data.split(b"\n", 1)[0]


def _answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class AgentLock(HolderLock):
    """``<store.dir>/agent.lock``: held (flock) by the running agent, or by the command
    line while it changes the store with no agent running; ``PID ROLE`` inside."""

    def __init__(self, store_dir: Path, role: Role = "agent") -> None:
        super().__init__(store_dir / LOCK_FILE, f"the store {store_dir}", role, StoreError)

    def holder_pid(self) -> int | None:
        """The pid of the process holding the lock (-1: not known yet), or None when free."""
        holder = self.holder()
        if holder is None:
            return None
        return holder.pid or -1


# -- the command line's side --------------------------------------------------------------


def ask(path: Path, command: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Send one request to the agent at ``path``; return its ``result``.

    Raises ControlError (``absent`` when no agent listens there: no socket file, or
    connection refused), PermissionError when the socket may not be used, CommandError
    when the agent refused the request (its message).
    """
    request = dumps({"command": command, "args": dict(args or {})}).encode() + b"\n"
    try:  # no socket file: no agent, and nothing to import (socket: ~2 ms of a status)
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ControlError(f"no agent answers at {path}", absent=True) from exc
    except OSError:  # not allowed to look: connecting says what it is
        pass
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(IO_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(f"no agent answers at {path}", absent=True) from exc
        except PermissionError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise ControlError(f"no agent answers at {path}", absent=True) from exc
            raise ControlError(f"cannot reach the agent at {path}: {exc}") from exc
        try:
            sock.sendall(request)
            line = _read_line(sock, f"the agent at {path} answered something unreadable: a reply")
        except TimeoutError as exc:
            raise ControlError(
                f"the agent at {path} did not answer within {IO_TIMEOUT_S:g} s"
            ) from exc
        except OSError as exc:
            raise ControlError(f"the agent at {path} closed the connection: {exc}") from exc
    unreadable = f"the agent at {path} answered something unreadable"
    try:
        reply = parse_object(line, what="reply", max_bytes=MAX_BYTES)
    except DocumentError as exc:
        raise ControlError(f"{unreadable}: {exc}") from None
    ok, error, result = reply.get("ok"), reply.get("error"), reply.get("result") or {}
    if ok is False and isinstance(error, str):
        raise CommandError(error)
    if ok is not True or not isinstance(result, dict):
        raise ControlError(f"{unreadable}: not an agent's reply ({{ok, result}} or {{ok, error}})")
    return result
