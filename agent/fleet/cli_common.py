"""What every ``edge-fleet`` command shares: option checks whose ConfigError names the
option, the broker connection the options describe, and taking the fleet's retained
reports into a :class:`~agent.fleet.view.FleetView`."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from agent.config import MODEL_NAME_PATTERN
from agent.errors import ConfigError, VerificationError
from agent.fleet.acl import check_device_id, check_prefix
from agent.fleet.broker import FleetBroker, options_from_args
from agent.fleet.view import REPORTS, FleetView
from agent.verify import KeyRing, load_private_key


def fleet_broker(args: argparse.Namespace) -> FleetBroker:
    """The connection the options describe (not connected); ConfigError names the option."""
    if not args.broker:
        raise ConfigError(["--broker: required (or set EDGE_FLEET_BROKER)"])
    problem = check_prefix(args.prefix)
    if problem:
        raise ConfigError([f"--prefix: {problem}"])
    check_seconds("--connect-timeout", args.connect_timeout)
    return FleetBroker(options_from_args(args))


def check_names(device: str | None = None, group: str | None = None) -> None:
    """``--device`` and ``--group`` usable in topics; else ConfigError naming each."""
    problems = []
    if device is not None and (problem := check_device_id(device)):
        problems.append(f"--device: {problem}")
    if group is not None and (problem := check_device_id(group)):
        problems.append(f"--group: {problem.replace('device id', 'group name')}")
    if problems:
        raise ConfigError(problems)


def print_line(line: str) -> None:
    """A progress line on stdout, flushed (the commands' ``say``)."""
    print(line, flush=True)


def check_seconds(option: str, value: float | None) -> None:
    """``value`` (of ``option``) None or a finite positive number; else ConfigError."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError([f"{option}: {value:g} is not a positive number of seconds"])


def check_release(model: str | None, version: int | None) -> None:
    """``--model`` a model name and ``--version`` positive (when given); else ConfigError."""
    if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
        raise ConfigError([f"--model: {model!r} is not a model name"])
    if version is not None and version < 1:
        raise ConfigError([f"--version: {version} is not a positive integer"])


def check_signing_key(path: Path | None) -> KeyRing | None:
    """Check ``--sign-key`` before anything is sent; its public half, or None."""
    if path is None:
        return None
    try:
        return KeyRing.of([load_private_key(path).public_key()], "--sign-key")
    except VerificationError as exc:
        raise ConfigError([f"--sign-key: {exc}"]) from exc


def load_reports(broker: FleetBroker, view: FleetView, streams: tuple[str, ...] = REPORTS) -> None:
    """Connect and take the retained reports of the fleet into ``view``."""
    broker.connect(view.subscriptions(streams))
    for message in broker.messages():
        view.take(message)


def snapshot(args: argparse.Namespace) -> FleetView:
    """The fleet's retained reports (shadow instructions too), read once from the broker."""
    view = FleetView(args.prefix)
    with fleet_broker(args) as broker:
        load_reports(broker, view, (*REPORTS, "shadow"))
    return view
