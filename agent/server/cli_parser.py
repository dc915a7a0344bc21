"""``edge-fleet serve`` and ``edge-fleet token``: their options and help pages.

argparse and texts only, light on purpose (tests/test_startup.py): ``edge-fleet --help``
loads nothing of the ``server`` extra nor of the fleet's MQTT side. The commands
themselves are :mod:`agent.server.cli`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.clihelp import command

DEFAULT_DB = "sqlite:///edge-fleet.db"
DEFAULT_LISTEN = "127.0.0.1:8080"
COMMANDS = ("serve", "token")
# (option, default, help): the dashboard's alert thresholds, checked by ALERT_RANGES
ALERT_OPTIONS = (
    ("--alert-offline-min", 10.0, "offline longer than this many minutes (default 10)"),
    ("--alert-temp-c", 80.0, "temperature at or above this, °C (default 80)"),
    ("--alert-error-pct", 5.0, "more than this %% of frames failed in 15 min (default 5)"),
    ("--alert-outbox-growth", 100.0, "outbox grew by this many messages in 15 min (default 100)"),
)

PAGES = {
    "serve": (
        "Run the fleet server: ingest every device's status, state, telemetry, events and "
        "replies from the broker into the database (SQLite file or PostgreSQL), serve the "
        "HTTP API under /api/v1 with /healthz and /metrics, and drive rollouts. Migrations "
        "are applied on start. SIGTERM or Ctrl-C stops it cleanly (exit 0).",
        "edge-fleet serve --broker mqtts://broker:8883 --ca ca.pem --cert fleet.pem \\\n"
        "    --key fleet.key --db sqlite:////var/lib/edge-fleet/fleet.db \\\n"
        "    --listen 0.0.0.0:8443 --tls-cert server.pem --tls-key server.key \\\n"
        "    --registry /srv/registry --sign-key keys/deploy.key",
    ),
    "token": (
        "Create, list and revoke the API tokens of the fleet server (roles: viewer reads, "
        "operator also deploys, rolls out and reads the audit log). A token is shown once, "
        "when created; the database keeps only its SHA-256. Each action is audited.",
        "edge-fleet token create --name grafana --role viewer\n"
        "edge-fleet token list --db postgresql://fleet@db/fleet\n"
        "edge-fleet token revoke --name grafana",
    ),
}


def add_commands(
    sub: Any,
    broker_options: Callable[[argparse.ArgumentParser], None],
    codes: str,
) -> None:
    """Add ``serve`` and ``token`` to the subcommands ``sub`` of edge-fleet."""
    env = os.environ.get
    serve = command(
        sub, "serve", "run the fleet server (ingestion, HTTP API, rollouts)", *PAGES["serve"], codes
    )
    broker_options(serve)
    _db_option(serve)
    web = serve.add_argument_group("HTTP", "where the API listens")
    web.add_argument(
        "--listen",
        default=env("EDGE_FLEET_LISTEN", DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"address of the HTTP API (default: $EDGE_FLEET_LISTEN, else {DEFAULT_LISTEN}; "
        "[::1]:8080 for IPv6)",
    )
    web.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    web.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    serve.add_argument(
        "--registry",
        default=env("EDGE_FLEET_REGISTRY"),
        metavar="DIR|URL",
        help="the release registry, a folder or http(s):// URL, for /api/v1/releases "
        "(default: $EDGE_FLEET_REGISTRY)",
    )
    serve.add_argument(
        "--sign-key",
        type=Path,
        default=env("EDGE_FLEET_SIGN_KEY"),
        help="Ed25519 deploy key signing every desired state the server publishes "
        "(default: $EDGE_FLEET_SIGN_KEY; without it deploys and rollouts are refused)",
    )
    serve.add_argument(
        "--client-id",
        default=f"edge-fleet-{_hostname()}",
        help="this instance's MQTT client id and name; fixed, it keeps the broker session "
        "(default: edge-fleet-HOSTNAME)",
    )
    serve.add_argument(
        "--share-group",
        default="edge-fleet",
        help="MQTT shared-subscription group of the instances (default: edge-fleet)",
    )
    serve.add_argument(
        "--raw-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="keep raw telemetry samples this long (default 7)",
    )
    serve.add_argument(
        "--agg-days",
        type=float,
        default=90.0,
        metavar="DAYS",
        help="keep 1-minute telemetry aggregates this long (default 90)",
    )
    limits = serve.add_argument_group("alerts", "when the dashboard flags a device")
    for flag, default, what in ALERT_OPTIONS:
        limits.add_argument(flag, type=float, default=default, metavar="N", help=what)

    token = command(sub, "token", "create, list or revoke API tokens", *PAGES["token"], codes)
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = command(
        actions,
        "create",
        "create a token and print it (once)",
        "Create an API token with a name and a role and print it; it is never "
        "shown again (the database keeps only its SHA-256).",
        "edge-fleet token create --name ci-deploy --role operator",
        codes,
    )
    create.add_argument("--name", required=True, help="a unique name (letters, digits, ._@-)")
    create.add_argument("--role", required=True, choices=("viewer", "operator"))
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = command(
        actions,
        "list",
        "list the tokens (never their hashes)",
        "List every token: name, role, created, revoked.",
        "edge-fleet token list --json",
        codes,
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = command(
        actions,
        "revoke",
        "revoke a token",
        "Revoke the live token of this name: it is refused from then on (401). "
        "Exit 1 when there is no live token of that name.",
        "edge-fleet token revoke --name ci-deploy",
        codes,
    )
    revoke.add_argument("--name", required=True, help="the token's name")
    for parser in (create, listing, revoke):
        _db_option(parser)


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("EDGE_FLEET_DB", DEFAULT_DB),
        metavar="URL",
        help=f"sqlite:///PATH or postgresql://USER@HOST/DB (default: $EDGE_FLEET_DB, else "
        f"{DEFAULT_DB}, a file in the current folder)",
    )


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:40]
    return name.strip("-._") or "host"
