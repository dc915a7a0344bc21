"""The log settings of a command line: level and format, from the options and the
environment, checked without loading :mod:`logging` (agent.logs sets logging up with
them; ``check-config``, which prints what it finds and logs nothing, only checks them).

The contract is agent.logs's (its module docstring): ``--log-level``, else
``$EDGE_AGENT_LOG_LEVEL`` (else the deprecated ``$EDGE_AGENT_LOG``), else the command's
default; ``--log-format``, else ``$EDGE_AGENT_LOG_FORMAT``, else text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Literal

# logging's own numbers (tests/test_logs.py checks them against logging.DEBUG, …)
LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
Format = Literal["text", "json"]
FORMATS: tuple[Format, ...] = ("text", "json")
LEVEL_ENV = "EDGE_AGENT_LOG_LEVEL"
OLD_LEVEL_ENV = "EDGE_AGENT_LOG"  # deprecated alias of LEVEL_ENV (read when it is unset)
FORMAT_ENV = "EDGE_AGENT_LOG_FORMAT"


class LogSettingError(ValueError):
    """A log level or format that is not one of the choices (exit 2: a usage error)."""


def resolve_level(option: str | None, environ: Mapping[str, str], default: str) -> int:
    """The logging level: the option, else ``$EDGE_AGENT_LOG_LEVEL`` (else the
    deprecated ``$EDGE_AGENT_LOG``), else ``default``.

    Raises LogSettingError naming the variable and the valid values when the
    environment holds something else (the option is checked by argparse).
    """
    variable = LEVEL_ENV if environ.get(LEVEL_ENV, "").strip() else OLD_LEVEL_ENV
    chosen = _choose(option, "--log-level", environ, variable, tuple(LEVELS), "a log level")
    return LEVELS[chosen or default]


def resolve_format(option: str | None, environ: Mapping[str, str]) -> Format:
    """``text`` or ``json``: the option, else ``$EDGE_AGENT_LOG_FORMAT``, else text.

    Raises LogSettingError like :func:`resolve_level`.
    """
    chosen = _choose(option, "--log-format", environ, FORMAT_ENV, FORMATS, "a log format")
    return "json" if chosen == "json" else "text"


def old_variable_used(option: str | None, environ: Mapping[str, str]) -> bool:
    """Whether the level comes from the deprecated ``$EDGE_AGENT_LOG`` (setup warns)."""
    return (
        option is None
        and bool(environ.get(OLD_LEVEL_ENV))
        and not environ.get(LEVEL_ENV, "").strip()
    )


def _choose(
    option: str | None,
    flag: str,
    environ: Mapping[str, str],
    variable: str,
    choices: tuple[str, ...],
    what: str,
) -> str | None:
    """The option's value, else the variable's (None: neither), checked against
    ``choices`` (any case)."""
    if option is not None:
        where, value = flag, option
    elif environ.get(variable, "").strip():
        where, value = variable, environ[variable]
    else:
        return None
    if value.strip().lower() in choices:
        return value.strip().lower()
    raise LogSettingError(f"{where}={escape(value)}: not {what}; use one of {', '.join(choices)}")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def escape(text: str, quote: bool = False) -> str:
    """``text`` with control and invisible characters written as escapes; with
    ``quote``, backslashes and double quotes too."""
    out = []
    for ch in text:
        if ch in _NAMED_ESCAPES and (quote or ch not in '"\\'):
            out.append(_NAMED_ESCAPES[ch])
        elif unicodedata.category(ch)[0] == "C":  # Cc, Cf, Cs, Co, Cn
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            else:
                out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
