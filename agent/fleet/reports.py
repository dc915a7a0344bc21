"""What a device reports, as the fleet tools take it: checked, never trusted.

A retained status, state or telemetry (and the events and results a rollout or
``telemetry`` follows) is whatever was published with a device's certificate: a broken
agent, or someone who holds that certificate. The fleet tools parse it with
:func:`agent.strictjson.parse_object` (at most :data:`MAX_BYTES`, nested at most
:data:`MAX_DEPTH`) and then :func:`clean` it:

- a field the tools use that has the wrong type (``"groups": "abc"``, ``"version":
  "1; rm"``, ``"state": {}``), or an enumerated one (event name, phase, outcome,
  status state) with a value :mod:`agent.contract` does not list, is dropped, and
  named in a problem;
- every string, keys included, is made printable: a control or other non-printable
  character (ESC, BEL, a C1 control, a bidi override, a newline) becomes its escape
  (``\\x1b``), and a string is cut to :data:`MAX_TEXT` characters (keys to
  :data:`MAX_KEY`), which is a problem too. Nothing a device supplies then reaches a
  terminal as a control sequence, whatever prints it.

Pure functions over plain values; :class:`agent.fleet.view.FleetView` applies them and
says what was wrong.
"""

from __future__ import annotations

from typing import Any

from agent.contract import (
    EVENT_NAMES,
    OFFLINE_REASONS,
    STATE_PHASES,
    STATUS_STATES,
    UPDATE_OUTCOMES,
    UPDATE_PHASES,
)

MAX_BYTES = 256 * 1024  # one report; the agent's are a few kilobytes
MAX_DEPTH = 16
MAX_TEXT = 1000  # characters of one string (an error message fits)
MAX_KEY = 64

# The fields the fleet tools read, per stream, and what they must be (None is always
# allowed: a field not reported). "int" excludes booleans; "number" is int or float; a
# tuple is the contract's values of an enumerated field (agent/contract.py): anything
# else there (a misspelling, a newer agent's value) is dropped like a wrong type.
# Every field named here is one of the contract's documents (tests/test_contract.py).
_STATUS: dict[str, Any] = {
    "ts": "number",
    "state": STATUS_STATES,
    "reason": OFFLINE_REASONS,
    "groups": "list[str]",
    "agent_version": "str",
}
_UPDATE = {
    "model": "str",
    "version": "int",
    "phase": UPDATE_PHASES,
    "outcome": UPDATE_OUTCOMES,
    "reason": "str",
    "issued_at": "number",
    "retry": "bool",
}
_DESIRED = {"model": "str", "version": "int", "issued_at": "number|str"}
_STATE = {
    "ts": "number",
    "model": "str",
    "version": "int",
    "serving": "int",
    "previous": "int",
    "backend": "str",
    "phase": STATE_PHASES,
    "last_error": "str",
    "agent_version": "str",
    "update": _UPDATE,
    "desired": _DESIRED,
    "bad": "list[str]",
}
_INFERENCE = {
    "fps": "number",
    "latency_ms_p95": "number",
    "backend": "str",
    "model": "str",
    "version": "int",
}
_TELEMETRY = {
    "ts": "number",
    "agent_version": "str",
    "cpu_pct": "number",
    "temp_c": "number",
    "rss_mb": "number",
    "inference": _INFERENCE,
    "outbox": {"depth": "number"},
}
_EVENTS = {"ts": "number", "event": EVENT_NAMES}
_RESULTS = {"ts": "number", "version": "int"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "status": _STATUS,
    "state": _STATE,
    "telemetry": _TELEMETRY,
    "desired": _DESIRED,
    "events": _EVENTS,
    "results": _RESULTS,
}


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``,
    ``\\u202e``) and cut to ``limit`` characters (then ``…``)."""
    if len(text) <= limit and text.isprintable():
        return text
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return text if len(text) <= limit else text[:limit] + "…"


def _fits(value: Any, kind: str | tuple[str, ...]) -> bool:
    if value is None:
        return True
    if isinstance(kind, tuple):
        return isinstance(value, str) and value in kind
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "number|str":
        return _fits(value, "number") or isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return printable(repr(value), 40)


def _string(value: str, limit: int, changed: list[str]) -> str:
    text = printable(value, limit)
    if text != value:
        changed.append(text)
    return text


def _text(value: Any, changed: list[str], limit: int = MAX_TEXT) -> Any:
    """``value`` with every string (keys too) printable and capped (at ``limit``
    characters; keys at MAX_KEY), at any depth; each string that had to change is
    appended to ``changed``."""
    if isinstance(value, str):
        return _string(value, limit, changed)
    if isinstance(value, dict):
        return {_string(k, MAX_KEY, changed): _text(v, changed, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v, changed, limit) for v in value]
    return value


def _check(doc: dict[str, Any], schema: dict[str, Any], path: str, problems: list[str]) -> None:
    for name, kind in schema.items():
        if name not in doc:
            continue
        value = doc[name]
        where = f"{path}.{name}" if path else name
        if isinstance(kind, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: {_describe(value)} is not an object (dropped)")
                del doc[name]
                continue
            _check(value, kind, where, problems)
        elif not _fits(value, kind):
            problems.append(f"{where}: {_describe(value)} is not {_kind(kind)} (dropped)")
            del doc[name]


_KINDS = {
    "str": "a string",
    "int": "an integer",
    "number": "a number",
    "number|str": "a number or a time",
    "bool": "true or false",
    "list[str]": "a list of strings",
}


def _kind(kind: str | tuple[str, ...]) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(kind[:6]) + (", …" if len(kind) > 6 else "")
    return _KINDS[kind]


def clean(
    stream: str, doc: dict[str, Any], text_limit: int = MAX_TEXT
) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``doc`` (a report on ``stream``) fit for the fleet tools, and one line
    per field dropped for its type (``state.version: '1; rm' is not an integer
    (dropped)``), and one when strings had to be escaped or cut (values at
    ``text_limit`` characters)."""
    changed: list[str] = []
    cleaned: dict[str, Any] = _text(doc, changed, text_limit)
    problems: list[str] = []
    _check(cleaned, SCHEMAS.get(stream, {}), "", problems)
    out = [f"{stream}.{p}" for p in problems]
    if changed:
        out.append(
            f"{stream}: {len(changed)} string(s) with control characters or too long "
            f"(escaped and cut: {printable(changed[0], 40)})"
        )
    return cleaned, out
