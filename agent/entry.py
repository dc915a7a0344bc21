"""The console scripts: ``edge-agent`` and ``edge-fleet``.

Importing a command line takes a while on a small board (YAML, msgspec, paho, numpy:
seconds on a Raspberry Pi), and a Ctrl-C meanwhile would end in a traceback, before
``main`` and its one-line errors are there. These two functions import it inside that
guarantee.
"""

from __future__ import annotations

import gc
import sys


def edge_agent() -> int:
    """``edge-agent``: ``agent.cli.main``; exit 130 when interrupted while loading."""
    try:
        from agent.cli import main
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    try:
        return main()
    finally:
        _ending()


def _ending() -> None:
    """The process ends with the command: the interpreter's last garbage collections
    would walk every object the imports made (~7 ms of `status` or `check-config`, a
    sixth of what they take beyond the interpreter's start). Frozen objects are left to
    the exit; atexit handlers (logging's flush) and the standard streams' flush still
    run, and nothing of the command is still open by now."""
    gc.freeze()


def edge_fleet() -> int:
    """``edge-fleet``: ``agent.fleet.cli.main``; exit 130 when interrupted while loading."""
    try:
        from agent.fleet.cli import main
    except KeyboardInterrupt:
        print("edge-fleet: interrupted", file=sys.stderr)
        return 130
    return main()
