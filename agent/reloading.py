"""Config reloads that report their outcome (``systemctl reload``, ``edge-agent reload``).

systemd 252 (Debian bookworm, Raspberry Pi OS bookworm) has no ``Type=notify-reload``,
and a kill-based ``ExecReload`` returns before the agent has read the new config: a
rejected config showed only in the journal. So the unit's ``ExecReload`` runs
``edge-agent reload``, which asks the running agent over its control socket to reload,
waits for the agent's answer and exits with it: 0 reloaded (or unchanged), 78 the new
config is not valid (the agent goes on with the old one), 1 the new config failed to
start (the agent went back to the old one) or no answer.

The agent's side is ``Reloads``: one per process (a reload replaces the ``Service``;
this stays). SIGHUP and the socket's ``reload`` command both ask for a reload and get
a ticket; the main loop serves every ticket asked so far with one reload and records
the outcome, which the socket's ``status`` shows as ``reload``. The command line polls
``status`` until the reload that served its ticket is done (``wait_for``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from agent.errors import EdgeAgentError

Outcome = Literal["reloaded", "unchanged", "rejected", "failed", "exiting"]

# What ``edge-agent reload`` exits with, per outcome (the contract in docs/protocol.md).
EXIT_CODES: Mapping[Outcome, int] = {
    "reloaded": 0,  # the new config runs
    "unchanged": 0,  # the file says what already runs
    "rejected": 78,  # not valid: the old config goes on
    "failed": 1,  # valid, but it did not start: the old config was started again
    "exiting": 1,  # neither started: the agent exits and systemd restarts it
}


class ReloadError(EdgeAgentError):
    """The reload's outcome could not be learnt (no agent, no answer in time)."""


@dataclass(frozen=True)
class Done:
    """One finished reload: it served every ticket up to ``ticket``."""

    ticket: int
    outcome: Outcome
    error: str | None
    at: float  # wall-clock time it finished


class Reloads:
    """Reload requests and the last outcome; thread-safe (signal loop, socket thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = 0
        self._last: Done | None = None

    def request(self) -> int:
        """Ask for a reload; returns the ticket that ``report()['done']`` will reach."""
        with self._lock:
            self._requested += 1
            return self._requested

    def due(self) -> int | None:
        """The newest ticket not yet served (one reload serves all up to it), or None."""
        with self._lock:
            done = self._last.ticket if self._last else 0
            return self._requested if self._requested > done else None

    def finish(self, ticket: int, outcome: Outcome, error: str | None = None) -> None:
        with self._lock:
            self._last = Done(ticket, outcome, error, time.time())

    def report(self) -> dict[str, Any]:
        """For ``status``: how many were asked for, served, and how the last one ended."""
        with self._lock:
            last = self._last
            return {
                "requested": self._requested,
                "done": last.ticket if last else 0,
                "outcome": last.outcome if last else None,
                "error": last.error if last else None,
                "at": last.at if last else None,
            }


def served(report: Any, ticket: int) -> Done | None:
    """The finished reload that served ``ticket``, from a ``status`` reply's ``reload``;
    None while it is not done. Raises ReloadError for a report that is not one."""
    if not isinstance(report, dict):
        raise ReloadError("the agent's status has no reload report (an older agent?)")
    done, outcome, error, at = (report.get(k) for k in ("done", "outcome", "error", "at"))
    if not isinstance(done, int) or isinstance(done, bool):
        raise ReloadError("the agent's reload report is unreadable: done")
    if done < ticket:
        return None
    if not isinstance(outcome, str) or outcome not in EXIT_CODES:
        raise ReloadError(f"the agent's reload report is unreadable: outcome {outcome!r}")
    if error is not None and not isinstance(error, str):
        raise ReloadError("the agent's reload report is unreadable: error")
    return Done(done, cast(Outcome, outcome), error, at if isinstance(at, (int, float)) else 0.0)


def wait_for(
    status: Callable[[], Mapping[str, Any] | None],
    ticket: int,
    timeout_s: float,
    *,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Done:
    """Poll ``status`` (None: the agent did not answer this time, as while it restarts
    its parts) until the reload serving ``ticket`` is done; ReloadError after
    ``timeout_s``."""
    deadline = clock() + timeout_s
    while True:
        reply = status()
        if reply is not None:
            done = served(reply.get("reload"), ticket)
            if done is not None:
                return done
        if clock() >= deadline:
            raise ReloadError(
                f"the agent did not finish the reload within {timeout_s:g} s "
                "(journalctl -u edge-agent says why)"
            )
        sleep(poll_s)
