"""What both command lines share: help pages, number options, and how they end.

Every command's ``--help`` has a description, examples and the exit codes. A run ends
in an exit code and, on failure, one line per problem: a closed output pipe ends
quietly (141, as Unix tools), and an exception nobody expected (a bug) is one line too,
with the traceback only when ``EDGE_AGENT_LOG_LEVEL=debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what `yes | head` reports under pipefail


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size().columns`` gives it ($COLUMNS,
    else stdout's terminal, else 80), without importing shutil (and zlib, bz2, lzma)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80
    return columns or 80


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter for texts written with their own line breaks, sized as argparse
    sizes it. Each parser makes one to check every option it is given, so on a command
    line that only runs a command this spares the import argparse's own sizing makes."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


def options() -> argparse.ArgumentParser:
    """A parser of shared options, given to commands as a parent."""
    return argparse.ArgumentParser(add_help=False, formatter_class=Formatter)


def exit_codes(failed: str, usage: str, config: bool) -> str:
    """The exit-code table of a tool's help: ``failed`` and ``usage`` say what 1 and 2
    mean; ``config`` for a tool that reads a config file (78)."""
    invalid = "  78   invalid configuration (systemd does not restart the agent on it)\n"
    return (
        "exit codes:\n"
        "  0    success\n"
        f"  1    {failed}\n"
        f"  2    {usage}\n"
        f"{invalid if config else ''}"
        "  130  interrupted (Ctrl-C)\n"
        "  141  the output pipe was closed (e.g. | head)"
    )


@contextlib.contextmanager
def words_looked_up_once() -> Iterator[None]:
    """While building parsers: each of argparse's words ("options", "show this help
    message and exit", ...) is looked up in gettext's catalogues once, not once per
    parser (each look-up searches the locale folders: ~1 ms of a command line's 16
    parsers). The same words come back: the catalogues do not change meanwhile."""
    original = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.cache(original)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        argparse._ = original  # type: ignore[attr-defined]


def tool(
    prog: str,
    description: str,
    examples: str,
    notes: str,
    codes: str,
    version: str,
    parents: list[argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    """A tool's top-level parser: description, examples, notes, exit codes, --version."""
    notes = f"{notes}\n\n" if notes else ""
    parser = argparse.ArgumentParser(
        prog=prog,
        parents=parents or [],
        description=textwrap.fill(description, 88),
        epilog=f"examples:\n{textwrap.indent(examples, '  ')}\n\n{notes}{codes}",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    return parser


def command(
    sub: Any,
    name: str,
    summary: str,
    description: str,
    examples: str,
    codes: str,
    parents: list[argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose --help has a wrapped description, examples and exit codes."""
    epilog = f"examples:\n{textwrap.indent(examples, '  ')}\n\n{codes}"
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=parents or [],
        help=summary,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        formatter_class=Formatter,
    )
    return parser


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a finite number greater than 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a number greater than 0: {text!r}")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    return value


def output_closed() -> int:
    """The reader of stdout went away (``| head``): end quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail
    return EXIT_PIPE_CLOSED


def internal_error(tool: str, exc: BaseException) -> int:
    """Report an unexpected exception (a bug) in one line; the traceback when debugging."""
    import traceback

    first_line = (str(exc).splitlines() or [""])[0]
    print(
        f"{tool}: internal error: {type(exc).__name__}: {first_line} "
        "(a bug; please report it with the traceback that EDGE_AGENT_LOG_LEVEL=debug prints)",
        file=sys.stderr,
    )
    if os.environ.get("EDGE_AGENT_LOG_LEVEL", "").lower() == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    return 1
