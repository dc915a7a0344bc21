"""The console scripts: ``edge-agent`` and ``edge-fleet``.

Importing a command line takes a while on a small board (pydantic, cryptography, numpy:
seconds on a Raspberry Pi), and a Ctrl-C meanwhile would end in a traceback, before
``main`` and its one-line errors are there. These two functions import it inside that
guarantee.
"""

from __future__ import annotations

import sys


def edge_agent() -> int:
    """``edge-agent``: ``agent.cli.main``; exit 130 when interrupted while loading."""
    try:
        from agent.cli import main
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    return main()


def edge_fleet() -> int:
    """``edge-fleet``: ``agent.fleet.cli.main``; exit 130 when interrupted while loading."""
    try:
        from agent.fleet.cli import main
    except KeyboardInterrupt:
        print("edge-fleet: interrupted", file=sys.stderr)
        return 130
    return main()
