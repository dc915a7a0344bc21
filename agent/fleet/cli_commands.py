"""``edge-fleet``'s commands (keygen, publish, index, acl, deploy, rollout, devices,
telemetry, forget, status, promote): :func:`run` once :mod:`agent.fleet.cli` has parsed the
options, dispatching to :mod:`agent.fleet.cli_setup` (no broker),
:mod:`agent.fleet.cli_deploy` (desired states), :mod:`agent.fleet.cli_devices` (reading the
fleet) and :mod:`agent.fleet.cli_shadow` (promote).

Exit codes (docs/protocol.md): 0 success, 1 the operation failed (the broker unreachable, a
rollout halted, a device that did not take its desired state), 2 bad usage (including
device ids, group or admin names that cannot be used in topics, and options that do
not go together). The broker options default to ``EDGE_FLEET_BROKER``,
``EDGE_FLEET_CA``, ``EDGE_FLEET_CERT``, ``EDGE_FLEET_KEY`` and ``EDGE_FLEET_USERNAME``
(password: ``--password-file`` or ``EDGE_FLEET_PASSWORD``).
"""

from __future__ import annotations

import argparse

from agent.fleet.cli_common import (
    check_names,
    check_release,
    check_seconds,
    check_signing_key,
    fleet_broker,
)
from agent.fleet.cli_deploy import run_deploy, run_rollout
from agent.fleet.cli_devices import run_devices, run_forget, run_status, run_telemetry
from agent.fleet.cli_setup import run_acl, run_index, run_keygen, run_publish
from agent.fleet.cli_shadow import promote


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; raises ConfigError (bad usage), EdgeAgentError,
    OSError (failed), as :func:`agent.fleet.cli.main` reports them."""
    if args.command == "keygen":
        run_keygen(args)
    elif args.command == "publish":
        run_publish(args)
    elif args.command == "index":
        run_index(args)
    elif args.command == "acl":
        run_acl(args)
    elif args.command == "deploy":
        return run_deploy(args)
    elif args.command == "rollout":
        return run_rollout(args)
    elif args.command == "devices":
        return run_devices(args)
    elif args.command == "status":
        return run_status(args)
    elif args.command == "telemetry":
        return run_telemetry(args)
    elif args.command == "forget":
        return run_forget(args)
    elif args.command == "promote":
        check_names(args.device, args.group)
        check_release(args.model, args.version)
        check_seconds("--wait", args.wait)
        check_signing_key(args.sign_key)
        return promote(args, fleet_broker(args), args.sign_key)
    return 0
