"""Every command of both tools explains itself: --help with a description, examples and
the exit codes, no reST markup; --version on both."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from agent import __version__, cli
from agent.fleet import cli as fleet_cli


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


AGENT = _commands(cli._parser())
FLEET = _commands(fleet_cli._parser())


def _help(main: object, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(argv)  # type: ignore[operator]
    assert exited.value.code == 0
    return out.getvalue()


def test_every_command_is_listed() -> None:
    assert {c[0] for c in AGENT if c} >= {
        "run",
        "check-config",
        "status",
        "models",
        "infer",
        "bench",
        "demo",
    }
    assert ("models", "pull") in AGENT and ("models", "rollback") in AGENT
    assert {c[0] for c in FLEET if c} >= {
        "keygen",
        "publish",
        "acl",
        "deploy",
        "rollout",
        "devices",
        "telemetry",
        "forget",
        "status",
    }


@pytest.mark.parametrize(
    ("main", "path"),
    [(cli.main, p) for p in AGENT] + [(fleet_cli.main, p) for p in FLEET],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else getattr(v, "__module__", ""),
)
def test_help_has_a_description_examples_and_exit_codes(
    main: object, path: tuple[str, ...]
) -> None:
    text = _help(main, [*path, "--help"])
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith("usage: ")
    description = rest.split("\n\n")[0]
    assert len(description) > 30 and not description.startswith(("options:", "positional")), text
    assert "\nexamples:\n  edge-" in text
    assert "\nexit codes:\n  0    success\n" in text
    assert "``" not in text and ":func:" not in text and ".. " not in text  # no reST markup


def test_broker_options_are_grouped() -> None:
    text = _help(fleet_cli.main, ["deploy", "--help"])
    assert "\nbroker:\n" in text
    broker_part = text.split("\nbroker:\n", 1)[1]
    assert "--broker URL" in broker_part and "--connect-timeout" in broker_part


@pytest.mark.parametrize(
    ("main", "tool"), [(cli.main, "edge-agent"), (fleet_cli.main, "edge-fleet")]
)
def test_version(main: object, tool: str) -> None:
    assert _help(main, ["--version"]).strip() == f"{tool} {__version__}"
