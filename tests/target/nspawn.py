"""A root filesystem booted with systemd as PID 1 (systemd-nspawn), and commands in it.

What works on a host whose PID 1 is not systemd (no D-Bus, no machined): no
registration, unified cgroups (otherwise ``DeviceAllow=`` is silently not enforced), the
console on a pipe, seccomp through BPF. ``--private-network``: the container has only its
own loopback. Commands go in with ``nsenter`` into the namespaces of the container's
PID 1, its network namespace included, under ``env -i`` (nothing of the host's
environment leaks in).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

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
