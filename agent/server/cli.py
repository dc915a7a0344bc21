"""``edge-fleet serve`` and ``edge-fleet token``: the commands.

Their options are :mod:`agent.server.cli_parser` (``add_commands``); :mod:`agent.fleet.cli`
calls :func:`main` for these commands. This module imports nothing of the ``server``
extra at import time; running a command without the extra is one line naming
``pip install 'edge-agent[server]'`` and exit 1.

Every option is checked before anything starts (no database opened, no port bound):
a bad value is one line and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import ipaddress
import math
import os
import re
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, DatabaseError
from agent.fleet.acl import check_device_id, check_group_name, check_prefix

if TYPE_CHECKING:
    from agent.server.context import ServeOptions

EXTRA = "pip install 'edge-agent[server]'"
NEEDED = ("sqlalchemy", "alembic", "fastapi", "uvicorn", "prometheus_client")
MAX_DAYS = 36_500.0
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ALERT_RANGES = {  # dest: (lowest, highest, unit)
    "alert_offline_min": (1.0, 10_080.0, "minutes"),
    "alert_temp_c": (20.0, 150.0, "°C"),
    "alert_error_pct": (0.1, 100.0, "%"),
    "alert_outbox_growth": (1.0, 1_000_000.0, "messages"),
}


def main(args: argparse.Namespace) -> int:
    """Run ``serve`` or ``token``; ConfigError (exit 2) and other failures are left to
    edge-fleet's main, except a missing extra (one line, exit 1)."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(
            f"edge-fleet: {args.command} needs the server extra ({', '.join(missing)} "
            f"missing): {EXTRA}",
            file=sys.stderr,
        )
        return 1
    from agent import logs

    if args.command == "serve":
        options = serve_options(args)  # every check before anything starts
        logs.setup(None, None, sys.stderr, default="info")
        from agent.server.serve import run

        return run(options)
    logs.setup(None, None, sys.stderr, default="warning")
    return _token(args)


# -- serve's options -----------------------------------------------------------------------


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The options of ``serve``, every one checked; ConfigError lists what is wrong."""
    from agent.fleet.broker import options_from_args
    from agent.server.context import ServeOptions
    from agent.server.db import parse_url
    from agent.server.ingest import IngestOptions
    from agent.server.web.alerts import Thresholds

    problems: list[str] = []
    if not args.broker:
        problems.append("--broker: required (or set EDGE_FLEET_BROKER)")
    if problem := check_prefix(args.prefix):
        problems.append(f"--prefix: {problem}")
    if problem := check_device_id(args.client_id):
        problems.append(f"--client-id: {problem.replace('device id', 'client id')}")
    if problem := check_group_name(args.share_group):
        problems.append(f"--share-group: {problem}")
    for name, value in (("--raw-days", args.raw_days), ("--agg-days", args.agg_days)):
        if not math.isfinite(value) or not 0 < value <= MAX_DAYS:
            problems.append(
                f"{name}: {value!r} must be a number of days above 0, up to {MAX_DAYS:g}"
            )
    for dest, (low, high, unit) in ALERT_RANGES.items():
        value = getattr(args, dest)
        if not math.isfinite(value) or not low <= value <= high:
            flag = "--" + dest.replace("_", "-")
            problems.append(f"{flag}: {value!r} must be {low:g} to {high:g} {unit}")
    if not math.isfinite(args.connect_timeout) or not 0 < args.connect_timeout <= 600:
        problems.append(f"--connect-timeout: {args.connect_timeout!r} must be 0 to 600 seconds")
    host, port, problem = parse_listen(args.listen)
    if problem:
        problems.append(f"--listen: {problem}")
    if (args.tls_cert is None) != (args.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    files = [
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--ca", args.ca),
        ("--cert", args.cert),
        ("--key", args.key),
        ("--password-file", args.password_file),
        ("--sign-key", args.sign_key),
    ]
    problems += [p for name, path in files if path is not None and (p := _unreadable(name, path))]
    if args.registry and (problem := _registry_problem(args.registry)):
        problems.append(f"--registry: {problem}")
    if args.sign_key is not None and not problems:
        problems += _key_problem(args.sign_key)
    if args.tls_cert is not None and args.tls_key is not None and not problems:
        problems += _tls_problem(args.tls_cert, args.tls_key)
    try:
        parse_url(args.db)
    except Exception as exc:  # DatabaseError: a URL we do not take
        problems.append(f"--db: {exc}")
    timeout = args.connect_timeout if math.isfinite(args.connect_timeout) else 10.0
    broker = options_from_args(args, timeout_s=timeout)
    if args.broker:
        try:
            broker.endpoint()
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return ServeOptions(
        db_url=args.db,
        broker=broker,
        ingest=IngestOptions(client_id=args.client_id, group=args.share_group),
        listen_host=host,
        listen_port=port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        registry=args.registry or None,
        sign_key=args.sign_key,
        raw_days=args.raw_days,
        agg_days=args.agg_days,
        alerts=Thresholds(
            offline_s=args.alert_offline_min * 60,
            outbox_growth=args.alert_outbox_growth,
            temp_high_c=args.alert_temp_c,
            error_share=args.alert_error_pct / 100,
        ),
    )


def parse_listen(text: str) -> tuple[str, int, str | None]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port, None), or ("", 0, the problem)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return "", 0, f"{text!r} is not [IPV6]:PORT"
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "", 0, f"{host!r} is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            return "", 0, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080)"
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            return "", 0, f"{host!r} is not a host name or address"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
        return "", 0, f"{port_text!r} is not a port (1-65535)"
    return host, int(port_text), None


def _unreadable(name: str, path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        return f"{name}: cannot read {path}: {exc.strerror or exc}"
    return None


def _registry_problem(value: str) -> str | None:
    if "://" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https", "file") or (
            parts.scheme != "file" and not parts.hostname
        ):
            return f"{value!r} is not a folder or an http(s):// URL"
        return None
    if not Path(value).is_dir():
        return f"{value} is not a folder"
    return None


def _key_problem(path: Path) -> list[str]:
    from agent.errors import EdgeAgentError
    from agent.verify import load_private_key

    try:
        load_private_key(path)
    except (EdgeAgentError, OSError, ValueError) as exc:
        return [f"--sign-key: {exc}"]
    return []


def _tls_problem(cert: Path, key: Path) -> list[str]:
    """Load the pair as uvicorn will, so a wrong file is refused before starting."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return [f"--tls-cert/--tls-key: cannot load {cert} with {key}: {reason}"]
    return []


# -- token -----------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError

    from agent.server import auth
    from agent.server.db import open_database
    from agent.strictjson import dumps

    name: str = getattr(args, "name", None) or ""
    if args.token_command != "list" and not TOKEN_NAME.fullmatch(name):
        raise ConfigError(
            [
                f"--name: {name[:80]!r} is not a token name (letters, digits, ._@-; "
                "at most 64, starting with a letter or digit)"
            ]
        )
    missing = _missing_sqlite_file(args.db)
    if missing is not None and args.token_command != "create":
        raise DatabaseError(
            f"database {args.db}: no such file ({missing}): no token was made there; "
            "check --db or EDGE_FLEET_DB (the systemd unit's is "
            "sqlite:////var/lib/edge-fleet/fleet.db)"
        )
    engine = open_database(args.db)  # DatabaseError: one line, exit 1 (edge-fleet's main)
    who = f"cli:{_unix_user()}"
    now = time.time()
    try:
        if args.token_command == "create":
            try:
                with engine.begin() as conn:
                    token = auth.create_token(conn, name, args.role, now)
                    auth.record(
                        conn,
                        now=now,
                        who=who,
                        action="token.create",
                        target=name,
                        outcome="ok",
                        detail={"role": args.role},
                    )
            except IntegrityError:
                raise ConfigError(
                    [
                        f"--name: a token named {name!r} exists (names are never "
                        "reused, revoked ones included)"
                    ]
                ) from None
            if args.json:
                print(dumps({"name": name, "role": args.role, "token": token}))
            else:
                print(token)
                print(f"token {name!r} ({args.role}): shown once; keep it secret", file=sys.stderr)
            return 0
        if args.token_command == "list":
            with engine.connect() as conn:
                rows = auth.list_tokens(conn)
            if args.json:
                print(dumps(rows, indent=2))
            else:
                print(_table(rows))
            return 0
        with engine.begin() as conn:
            done = auth.revoke_token(conn, name, now)
            auth.record(
                conn,
                now=now,
                who=who,
                action="token.revoke",
                target=name,
                outcome="ok" if done else "not_found",
            )
        if not done:
            print(f"edge-fleet: no live token named {name!r}", file=sys.stderr)
            return 1
        print(f"revoked token {name!r}")
        return 0
    finally:
        engine.dispose()


def _missing_sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite:///PATH`` URL names when it does not exist, else None (other
    URLs, or one that does not parse: :func:`open_database` says what is wrong). Listing
    or revoking in a file that is not there would create an empty database and answer
    as if there were no tokens: a mistyped ``--db`` or another working directory."""
    if not url.startswith("sqlite:///"):
        return None
    path = Path(url.removeprefix("sqlite:///").partition("?")[0])
    return path if str(path) not in ("", ".") and not path.exists() else None


def _table(rows: list[dict[str, Any]]) -> str:
    def when(ts: float | None) -> str:
        return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))

    lines = [("NAME", "ROLE", "CREATED (UTC)", "REVOKED (UTC)")]
    lines += [(r["name"], r["role"], when(r["created"]), when(r["revoked"])) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(line))
        for line in lines
    )


def _unix_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
