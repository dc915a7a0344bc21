"""``edge-fleet devices``, ``status``, ``telemetry`` and ``forget``: the commands that read
the fleet's reports from the broker (and remove a device's retained ones)."""

from __future__ import annotations

import argparse
import sys
import time

from agent.desired import desired_topic, shadow_topic
from agent.errors import ConfigError
from agent.fleet.cli_common import check_names, check_seconds, fleet_broker, load_reports, snapshot
from agent.fleet.render import describe, devices_table
from agent.fleet.status import model_status, status_text
from agent.fleet.view import FOLLOWED, REPORTS, FleetView
from agent.strictjson import dumps


def run_forget(args: argparse.Namespace) -> int:
    """``forget``: clear a device's retained reports, desired states and shadow
    instructions (1 while it says it is online, unless ``--force``)."""
    check_names(args.device)
    view = FleetView(args.prefix)
    with fleet_broker(args) as broker:
        load_reports(broker, view, ("status", "desired", "shadow"))
        device = view.devices.get(args.device)
        if device is not None and device.online and not args.force:
            print(
                f"edge-fleet: {args.device} says it is online; stop it first (or --force: "
                "it will report again when it reconnects)",
                file=sys.stderr,
            )
            return 1
        for stream in REPORTS:
            broker.publish(f"{args.prefix}/{args.device}/{stream}", b"")
        for model in sorted(device.desired_models if device is not None else ()):
            broker.publish(desired_topic(args.prefix, f"device:{args.device}", model), b"")
        for model in sorted(device.shadows if device is not None else ()):
            broker.publish(shadow_topic(args.prefix, f"device:{args.device}", model), b"")
    print(f"forgot {args.device}: its retained {', '.join(REPORTS)} are removed")
    return 0


def run_devices(args: argparse.Namespace) -> int:
    """``devices``: the table (or ``--json`` rows) of the reporting devices."""
    if args.group:
        check_names(group=args.group)
    view = snapshot(args)
    if args.group:
        keep = set(view.members(args.group))
        view.devices = {k: v for k, v in view.devices.items() if k in keep}
    if args.json:
        print(dumps([d.row() for d in view.reporting()], indent=2))
    else:
        print(devices_table(view))
    return 0


def run_status(args: argparse.Namespace) -> int:
    """``status --model``: versions, shadow runs and drift of one model across the fleet."""
    view = snapshot(args)
    status = model_status(view, args.model)
    print(dumps(status, indent=2) if args.json else status_text(status))
    return 0


def run_telemetry(args: argparse.Namespace) -> int:
    """``telemetry``: follow live reports, one line each, for ``--seconds`` or ``--count``."""
    if args.device:
        check_names(args.device)
    view = FleetView(args.prefix)
    streams = tuple(args.stream or FOLLOWED)
    topics = view.subscriptions(streams, device=args.device or "+")
    check_seconds("--seconds", args.seconds)
    if args.count is not None and args.count < 1:
        raise ConfigError([f"--count: {args.count} is not a positive number"])
    deadline = time.monotonic() + args.seconds if args.seconds is not None else None
    seen = 0
    with fleet_broker(args) as broker:
        broker.connect(topics)
        while args.count is None or seen < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            for message in broker.messages(timeout=min(0.5, left) if left else 0.5):
                report = view.take(message)
                if report is None or report.retained or report.device is None:
                    continue  # retained telemetry is the last known, not live news
                if args.json:
                    line = {"device": report.device, "stream": report.stream, "doc": report.doc}
                    print(dumps(line), flush=True)
                else:
                    print(describe(report), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    return 0
