"""``edge-agent reload``: the running agent re-reads its config, and says how it went.

The unit's ``ExecReload`` (so ``systemctl reload edge-agent`` fails when the agent
refuses the new config). The file is checked here first: a config that cannot be read
or is not valid names its problems and exits 78 without asking the agent (whose control
socket the file may not even say any more); under systemd the agent is still sent
SIGHUP (``$MAINPID``), so it records the rejection (``config_rejected``) as well.
A valid one: the agent is asked over its control socket, and its outcome is the
command's (agent.reloading).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent.commands import CommandError
from agent.config import Config, load_config
from agent.control import ControlError, ask
from agent.errors import ConfigError
from agent.preflight import check
from agent.reloading import EXIT_CODES, Done, ReloadError, wait_for
from agent.strictjson import dumps


def cmd_reload(path: Path, timeout_s: float, as_json: bool) -> int:
    try:
        config = load_config(path)
        problems = check(config).errors
        if problems:
            raise ConfigError([f"{path}: {p}" for p in problems])
    except ConfigError:
        _signal_main_pid()  # the agent logs and reports the rejection too
        raise
    socket = config.control_socket
    try:
        ticket = ask(socket, "reload")["ticket"]
    except (ControlError, CommandError) as exc:
        if _signal_main_pid():
            print(
                f"edge-agent: warning: {exc}; sent SIGHUP to the agent instead (its outcome "
                "is in the journal: journalctl -u edge-agent)",
                file=sys.stderr,
            )
            return 0
        if isinstance(exc, ControlError) and exc.absent:
            raise ReloadError(
                f"no agent answers at {socket}: is it running? (systemctl status edge-agent)"
            ) from None
        raise
    if not isinstance(ticket, int) or isinstance(ticket, bool):
        raise ReloadError(f"the agent at {socket} answered something unreadable: ticket")
    done = wait_for(lambda: _status(config), ticket, timeout_s)
    return _report(done, path, as_json)


def _status(config: Config) -> dict[str, Any] | None:
    """The agent's status; None while it does not answer (it restarts its parts)."""
    try:
        return ask(config.control_socket, "status")
    except ControlError:
        return None


def _signal_main_pid() -> bool:
    """SIGHUP to systemd's ``$MAINPID`` (set for ExecReload); False without one."""
    raw = os.environ.get("MAINPID", "")
    if not raw.isdigit() or int(raw) <= 1:
        return False
    try:
        os.kill(int(raw), signal.SIGHUP)
    except OSError:
        return False
    return True


def _report(done: Done, path: Path, as_json: bool) -> int:
    code = EXIT_CODES[done.outcome]
    if as_json:
        print(dumps({"config": str(path), "outcome": done.outcome, "error": done.error}))
        return code
    if done.outcome == "reloaded":
        print(f"edge-agent: reloaded {path}")
    elif done.outcome == "unchanged":
        print(f"edge-agent: {path} is unchanged: nothing to reload")
    elif done.outcome == "rejected":
        for line in (done.error or "").splitlines() or [""]:
            print(f"edge-agent: invalid configuration: {line}", file=sys.stderr)
        print("edge-agent: the agent goes on with its previous configuration", file=sys.stderr)
    elif done.outcome == "failed":
        print(
            f"edge-agent: reload failed: {done.error}; the agent went back to its previous "
            "configuration (journalctl -u edge-agent)",
            file=sys.stderr,
        )
    else:
        print(
            f"edge-agent: reload failed: {done.error}; the agent exits and systemd restarts it",
            file=sys.stderr,
        )
    return code
