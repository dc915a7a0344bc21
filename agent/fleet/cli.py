"""``edge-fleet``: the operator's commands (keygen, publish, index, acl, deploy, rollout,
devices, telemetry, status; serve and token from :mod:`agent.server.cli`).

Exit codes (docs/protocol.md): 0 success, 1 the operation failed (the broker unreachable, a
rollout halted, a device that did not take its desired state), 2 bad usage (including
device ids, group or admin names that cannot be used in topics, and options that do
not go together). The broker options default to ``EDGE_FLEET_BROKER``,
``EDGE_FLEET_CA``, ``EDGE_FLEET_CERT``, ``EDGE_FLEET_KEY`` and ``EDGE_FLEET_USERNAME``
(password: ``--password-file`` or ``EDGE_FLEET_PASSWORD``).

The options and help pages are :mod:`agent.fleet.cli_parser` (light); the commands,
:mod:`agent.fleet.cli_commands` and :mod:`agent.server.cli`, are imported once the
options are parsed (tests/test_startup.py).
"""

from __future__ import annotations

import sys

from agent.clihelp import internal_error, output_closed
from agent.errors import ConfigError, EdgeAgentError
from agent.fleet.cli_parser import build as _parser
from agent.server.cli_parser import COMMANDS as SERVER_COMMANDS

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # every command's import is inside: a Ctrl-C while loading is one line too
        if args.command in SERVER_COMMANDS:
            from agent.server.cli import main as server_main

            return server_main(args)
        from agent.fleet.cli_commands import run

        return run(args)
    except KeyboardInterrupt:
        print("edge-fleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return output_closed()
    except ConfigError as exc:  # bad usage (unusable names, clashing options): nothing written
        print(f"edge-fleet: {exc}".replace("\n", "\nedge-fleet: "), file=sys.stderr)
        return 2
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, and the traceback when debugging
        return internal_error("edge-fleet", exc)


if __name__ == "__main__":
    sys.exit(main())
