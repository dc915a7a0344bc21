"""``edge-agent``: the device's command line.

Exit codes (docs/protocol.md): 0 success; 1 the operation failed (download refused, …);
2 bad command-line usage; 78 (EX_CONFIG) invalid configuration.

The options and help pages are :mod:`agent.cli_parser` (light); each command imports
what it needs when it runs, so ``--help``, ``--version``, ``status`` and ``check-config``
load no runtime, OpenCV, MQTT client or fleet code (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli_parser import DEFAULT_CONFIG_PATH, EX_CONFIG, refuse_unused
from agent.cli_parser import build as _parser
from agent.clihelp import internal_error, output_closed
from agent.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    from agent.config import Config

__all__ = ["EX_CONFIG", "main"]


def _config_path(args: argparse.Namespace) -> Path:
    explicit: Path | None = getattr(args, "config", None)
    return explicit or Path(os.environ.get("EDGE_AGENT_CONFIG", str(DEFAULT_CONFIG_PATH)))


def cmd_run(config: Config, path: Path) -> int:
    """The daemon (agent.daemon.run): until SIGTERM or SIGINT; SIGHUP reloads."""
    from agent.daemon import run

    return run(config, path)


def cmd_check_config(config: Config, path: Path, as_json: bool) -> int:
    """Errors (the config cannot work here) exit 78; warnings are printed, exit 0."""
    from agent.preflight import check

    found = check(config, probe_network=True)
    errors = [f"{path}: {e}" for e in found.errors]
    warnings = [f"{path}: {w}" for w in found.warnings]
    if as_json:
        from agent.strictjson import dumps  # and json: not for the lines

        doc = {"ok": not errors, "config": str(path), "errors": errors, "warnings": warnings}
        print(dumps(doc, indent=2))
        return EX_CONFIG if errors else 0
    for line in errors:
        print(f"edge-agent: invalid configuration: {line}", file=sys.stderr)
    for line in warnings:
        print(f"edge-agent: warning: {line}", file=sys.stderr)
    if errors:
        return EX_CONFIG
    print(f"{path}: configuration is valid" + (" (with warnings)" if warnings else ""))
    return 0


def cmd_model_tool(args: argparse.Namespace, path: Path, as_json: bool) -> int:
    """infer and bench: the config is optional (its runtime section, when there is one)."""
    import msgspec

    from agent import oneshot
    from agent.config import RuntimeConfig, load_config

    explicit = getattr(args, "config", None) is not None or "EDGE_AGENT_CONFIG" in os.environ
    runtime = load_config(path).runtime if explicit or path.exists() else RuntimeConfig()
    overrides = {"accelerator": args.accelerator, "threads": args.threads}
    runtime = msgspec.structs.replace(
        runtime, **{k: v for k, v in overrides.items() if v is not None}
    )
    model = oneshot.open_model(
        args.model,
        args.task,
        args.labels,
        runtime,
        args.top_k,
        args.min_score,
        args.input_mean,
        args.input_std,
    )
    try:
        if model.note:
            print(f"edge-agent: {model.note}", file=sys.stderr)
        if args.command == "infer":
            reload = oneshot.reloader(runtime, args.top_k, args.min_score)
            return oneshot.infer(model, args.inputs, as_json, runtime, reload)
        return oneshot.bench(model, args.seconds, args.rounds, as_json)
    finally:
        model.close()


def cmd_demo(args: argparse.Namespace, as_json: bool) -> int:
    """The demo needs no config: it makes its own (see agent.demo)."""
    from agent.demo import run_demo

    try:
        return run_demo(args.seconds, args.broker, sys.stdout, as_json, args.keep)
    except ConfigError as exc:  # a bad option (--keep on a used folder), not a config file
        print(f"edge-agent: demo: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """The entry point: every failure ends in one line per problem and an exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    refuse_unused(parser, args)
    try:  # from here every import is inside: a Ctrl-C while loading is one line too
        from agent import logsettings

        level, fmt = getattr(args, "log_level", None), getattr(args, "log_format", None)
        default = "info" if args.command == "run" else "warning"
        try:
            if args.command == "check-config" and not logsettings.old_variable_used(
                level, os.environ
            ):  # it prints what it finds and logs nothing: the settings are only checked
                logsettings.resolve_level(level, os.environ, default)
                logsettings.resolve_format(fmt, os.environ)
            elif args.command == "status" and not logsettings.old_variable_used(
                level, os.environ
            ):  # it seldom logs: logging is set up (and imported) before a first line
                logsettings.resolve_level(level, os.environ, default)
                logsettings.resolve_format(fmt, os.environ)
                from agent import lazylog

                lazylog.defer(lambda: _setup_logs(level, fmt, default, ring=False))
            else:  # an agent serves its `logs` command from a ring of the last lines
                _setup_logs(level, fmt, default, ring=args.command in ("run", "demo"))
        except logsettings.LogSettingError as exc:  # from the environment (options are choices)
            print(f"edge-agent: {exc}", file=sys.stderr)
            return 2
        return _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge-agent: invalid configuration: {problem}", file=sys.stderr)
        return EX_CONFIG
    except EdgeAgentError as exc:
        family = type(exc).__name__.removesuffix("Error").lower() or "error"
        print(f"edge-agent: {family}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edge-agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return output_closed()
    except OSError as exc:  # permissions, a read-only or missing disk: say so in one line
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, and the traceback when debugging
        return internal_error("edge-agent", exc)


def _setup_logs(level: str | None, fmt: str | None, default: str, *, ring: bool) -> None:
    from agent import logs

    logs.setup(level, fmt, sys.stderr, default=default, ring=ring)


def _load_msgspec_alone() -> None:
    """Import msgspec without typing_extensions (and the inspect, dis, ast and tokenize
    it imports: ~7 ms of ``status`` or ``check-config``, a third of their budget).

    msgspec takes only ``get_type_hints``, ``Required`` and ``NotRequired`` from it and
    falls back to typing's when it cannot be imported: from Python 3.11 they are the same
    (typing_extensions' ``get_type_hints`` is typing's with ``include_extras=True``, as
    msgspec always calls it; the other two are typing's objects). Kept out for that one
    import only: a later import of typing_extensions works as ever.
    """
    if sys.version_info < (3, 11) or "msgspec" in sys.modules:
        return
    if "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # a None entry: its import is an ImportError
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


def _dispatch(args: argparse.Namespace) -> int:
    as_json = bool(getattr(args, "json", False))
    path = _config_path(args)
    if args.command in ("infer", "bench"):
        return cmd_model_tool(args, path, as_json)
    if args.command == "demo":
        return cmd_demo(args, as_json)
    if args.command == "reload":
        from agent.cli_reload import cmd_reload

        return cmd_reload(path, args.timeout, as_json)
    if args.command in ("status", "check-config"):
        _load_msgspec_alone()
    from agent.config import load_config

    config = load_config(path)
    if args.command == "run":
        return cmd_run(config, path)
    if args.command == "check-config":
        return cmd_check_config(config, path, as_json)
    if args.command == "status":
        from agent.cli_store import cmd_status

        return cmd_status(config, as_json)
    from agent.cli_store import cmd_models_list, cmd_models_pull, cmd_models_rollback
    from agent.stores import model_config

    name = args.model_name
    config = model_config(config, name)
    if args.models_command == "list":
        return cmd_models_list(config, args.remote, as_json)
    if args.models_command == "pull":
        wait_s = None if args.no_wait else args.wait
        return cmd_models_pull(config, args.version, wait_s, as_json, name)
    return cmd_models_rollback(config, args.to, as_json, name)


if __name__ == "__main__":
    sys.exit(main())
