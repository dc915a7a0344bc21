"""A root filesystem booted with systemd as PID 1 (systemd-nspawn), and commands in it.

What works on a host whose PID 1 is not systemd (no D-Bus, no machined): no
registration, unified cgroups (otherwise ``DeviceAllow=`` is silently not enforced), the
console on a pipe, seccomp through BPF. ``--private-network``: the container has only its
own loopback. Commands go in with ``nsenter`` into the namespaces of the container's
PID 1, its network namespace included, under ``env -i`` (nothing of the host's
environment leaks in).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from tests.target.common import CHROOT_ENV, Failed, run

BOOTED = ("running", "degraded")


class Container:
    """One boot of ``root``: ``boot``, then ``sh`` as often as needed, then ``poweroff``
    (or ``close``, which also ends a container that would not stop)."""

    def __init__(self, root: Path, name: str, console: Path, binds: dict[Path, str]) -> None:
        self.root = root
        self.name = name
        self.console = console
        self.binds = binds
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host numbers it

    def boot(self, timeout: float) -> str:
        """Start the container; return once systemd says running or degraded (the state)."""
        argv = [
            "systemd-nspawn",
            "-b",
            "-D",
            str(self.root),
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--system-call-filter=bpf",
            "--private-network",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()),
        ]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with self.console.open("ab") as log:
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        self.leader = self._wait_leader(deadline)
        state = ""
        while time.monotonic() < deadline:
            self._alive()
            done = self.sh("systemctl is-system-running", timeout=30, check=False)
            state = done.stdout.strip()
            if state in BOOTED:
                return state
            time.sleep(0.5)
        raise Failed(f"systemd did not finish booting within {timeout:g} s (state: {state})")

    def _alive(self) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            code = None if self.nspawn is None else self.nspawn.returncode
            raise Failed(f"systemd-nspawn ended (exit {code}); see its console log")

    def _wait_leader(self, deadline: float) -> int:
        """The container's PID 1: the child of systemd-nspawn that is PID 1 in its own
        PID namespace, once it has exec'd systemd (before, it is still nspawn's child)."""
        assert self.nspawn is not None
        while time.monotonic() < deadline:
            self._alive()
            for pid in _descendants(self.nspawn.pid):
                command = _command(pid)
                if _namespace_pid(pid) == 1 and command and "nspawn" not in command.split()[0]:
                    return pid
            time.sleep(0.2)
        raise Failed("no container PID 1 under systemd-nspawn")

    def sh(
        self,
        command: str,
        *,
        timeout: float,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``sh -c COMMAND`` inside the container (its namespaces, root, cwd /)."""
        self._alive()
        # -n too: with --private-network the container's loopback is not the host's
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w"]
        argv += ["env", "-i", *(f"{k}={v}" for k, v in {**CHROOT_ENV, **(env or {})}.items())]
        return run([*argv, "/bin/sh", "-c", command], timeout=timeout, check=check, input=input)

    def existing(self, paths: tuple[str, ...]) -> list[str]:
        """Which of ``paths`` exist inside."""
        listed = " ".join(paths)
        done = self.sh(f"for p in {listed}; do [ ! -e $p ] || echo $p; done", timeout=30)
        return done.stdout.split()

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def poweroff(self, timeout: float) -> float:
        """``systemctl poweroff`` inside; return how long systemd-nspawn took to end."""
        assert self.nspawn is not None
        began = time.monotonic()
        self.sh("systemctl poweroff", timeout=30, check=False)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise Failed(f"systemd-nspawn still running {timeout:g} s after poweroff") from exc
        if self.nspawn.returncode != 0:
            raise Failed(f"systemd-nspawn exited {self.nspawn.returncode} after poweroff")
        return time.monotonic() - began

    def close(self) -> None:
        """End the container whatever its state: SIGTERM (nspawn halts it), then SIGKILL."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        self.nspawn.send_signal(signal.SIGTERM)
        try:
            self.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(10)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            found += children
            todo += children
    return found


def _namespace_pid(pid: int) -> int | None:
    """The process's PID in its innermost PID namespace (NSpid's last field)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Unit:
    """A systemd unit inside a booted container: its properties and its journal."""

    def __init__(self, box: Container, name: str) -> None:
        self.box = box
        self.name = name

    def show(self, properties: str) -> dict[str, str]:
        """``systemctl show -p PROPERTIES`` (comma-separated) as a dict."""
        done = self.box.sh(f"systemctl show -p {properties} {self.name}", timeout=30)
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def wait(
        self, properties: str, ok: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> dict[str, str]:
        """Poll ``show(properties)`` until ``ok`` holds; Failed naming ``what`` after
        ``timeout`` s, with what was last shown."""
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while time.monotonic() < deadline:
            shown = self.show(properties)
            if ok(shown):
                return shown
            time.sleep(1)
        raise Failed(f"not {what} within {timeout:g} s: {shown}")

    def cursor(self) -> str:
        """Where the whole journal ends now: ``journal(after=…)`` shows what comes next."""
        done = self.box.sh("journalctl -q -n 1 -o cat --show-cursor", timeout=30, check=False)
        found = re.search(r"^-- cursor: (\S+)", done.stdout, re.MULTILINE)
        if not found:
            raise Failed(f"journalctl printed no cursor: {done.stdout[-200:]!r}")
        return found.group(1)

    def journal(self, after: str = "") -> str:
        """The unit's messages (all, or those after the cursor ``after``)."""
        since = f"--after-cursor='{after}'" if after else ""
        return self.box.sh(f"journalctl -q -o cat -u {self.name} {since}", timeout=60).stdout

    def wait_journal(self, after: str, text: str, timeout: float) -> str:
        """Wait until the unit's journal after the cursor ``after`` has ``text``."""
        deadline = time.monotonic() + timeout
        log = ""
        while time.monotonic() < deadline:
            log = self.journal(after)
            if text in log:
                return log
            time.sleep(0.5)
        raise Failed(f"no {text!r} in the journal within {timeout:g} s:\n{log[-1500:]}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a run like Ctrl-C (KeyboardInterrupt), so its clean-up runs."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
