"""Commands inside an arm64 root filesystem: the venv on PATH, processes left running in
the background, the running agent's status. Shared by arm64.py and arm64_tflite.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.target import common
from tests.target.common import Failed, Overlay

VENV = "/opt/edge-agent/venv"
WORK = "/srv/target"  # inside: models, images, keys, registry, device files
ZOO = "/var/cache/edge-agent"  # inside: EDGE_AGENT_CACHE, the host's zoo cache


def inside_env(venv: str = VENV) -> dict[str, str]:
    """The environment of a command inside: ``venv``'s bin first on PATH."""
    return {
        "PATH": f"{venv}/bin:{common.CHROOT_ENV['PATH']}",
        "EDGE_AGENT_CACHE": ZOO,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def show_tail(text: str, lines: int) -> None:
    """The end of some output, indented, on stderr (as common.run shows a failure)."""
    print("\n".join(f"    | {line}" for line in text.splitlines()[-lines:]), file=sys.stderr)


def inside(view: Overlay, command: str, timeout: float, venv: str = VENV) -> str:
    """``command`` in the root filesystem with the venv first on PATH; its stdout."""
    return view.chroot(command, timeout=timeout, env=inside_env(venv)).stdout


def free_port() -> int:
    """A free TCP port on the host's loopback (a chroot shares the host's network)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def background(view: Overlay, name: str, command: str, venv: str = VENV) -> None:
    """``command`` left running inside; its output in WORK/NAME.log, its pid in NAME.pid."""
    inside(
        view,
        f"cd {WORK} && {{ {command} >{name}.log 2>&1 </dev/null & echo $! >{name}.pid; }}",
        timeout=60,
        venv=venv,
    )


def agent_status(view: Overlay, venv: str = VENV) -> dict[str, object]:
    """What the running agent answers on its control socket ({} while it cannot)."""
    command = f"edge-agent status --json --config {WORK}/device.yaml"
    out = inside(view, command, timeout=120, venv=venv)
    daemon = json.loads(out).get("daemon") or {}
    status = daemon.get("status") if isinstance(daemon, dict) else None
    return status if isinstance(status, dict) else {}


def results(status: dict[str, object]) -> int:
    stats = status.get("stats")
    return int(stats.get("results", 0)) if isinstance(stats, dict) else 0


def wait_serving(
    view: Overlay, version: int, more_than: int, timeout: float, venv: str = VENV
) -> dict[str, object]:
    """Wait until the agent serves ``version`` with more than ``more_than`` results."""
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = agent_status(view, venv)
        if status.get("serving") == version and results(status) > more_than:
            return status
        time.sleep(2)
    show_tail((view.root / WORK.lstrip("/") / "agent.log").read_text(errors="replace"), 20)
    raise Failed(f"not serving v{version} after {timeout:g} s; status: {status}")


def stop(view: Overlay, name: str) -> None:
    """SIGTERM a background process started by ``background``; wait (bounded) for its end."""
    pid = (view.root / WORK.lstrip("/") / f"{name}.pid").read_text().strip()
    inside(view, f"kill -TERM {pid}", timeout=30)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise Failed(f"{name} (pid {pid}) still running 60 s after SIGTERM")
        time.sleep(0.5)


def kill_leftovers(view: Overlay) -> None:
    """End what still runs inside this root filesystem (the agent, the registry, a test
    that outlived its timeout), found by their root directory."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "root") == str(view.root):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue
