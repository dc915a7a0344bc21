"""JSON across the trust boundary: one parser for every document that comes from outside,
one writer for every document we emit.

In: :func:`parse_object` takes the bytes of a manifest, an index, a desired state, a
command (MQTT or the control socket) or a device's report as the fleet tools read it,
and returns a dict, or raises :class:`~agent.errors.DocumentError` with one line
``WHAT: why``. It refuses, before or while parsing:

- more than ``max_bytes`` bytes;
- bytes that are not UTF-8 (a BOM included);
- nesting deeper than ``max_depth`` (counted without recursion, before parsing: a
  64 KiB ``[[[[…`` never reaches the parser);
- ``NaN``, ``Infinity``, ``-Infinity`` and numbers that only fit as infinity (``1e400``);
- integers beyond 64 bits (so Python's 4300-digit limit is never the one that speaks);
- the same key twice in one object: parsers disagree on which one wins, and a signature
  covers one reading of the bytes, so both readings are refused rather than one picked;
- anything but an object at the top.

Out: :func:`dumps` is ``json.dumps`` that writes only strict JSON: non-finite floats
(a NaN from a model's output, a division by nothing) become ``null`` first, and
``allow_nan=False`` stands behind that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from agent.errors import DocumentError

MAX_DEPTH = 32  # objects and arrays inside each other; our documents use at most 5
INT_LIMIT = 2**63  # integers must lie strictly inside (-INT_LIMIT, INT_LIMIT)

# A JSON string literal (the unrolled form: linear, no nested repetition).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def nesting_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in ``text``, strings skipped; no
    recursion, linear time. Malformed text gets an approximate answer (the parser
    refuses it anyway)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # checked before int(): no 4300-digit conversions
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits is beyond 64 bits")
    value = int(text)
    if not -INT_LIMIT < value < INT_LIMIT:
        raise ValueError(f"integer {value} is beyond 64 bits")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key[:40]!r} appears twice in one object")
            seen.add(key)
    return doc


def parse_object(
    data: bytes, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """The JSON object in ``data``, under the rules of this module's docstring.

    Raises DocumentError (a ValueError) with one line naming ``what``; nothing else
    escapes, whatever the bytes.
    """
    if len(data) > max_bytes:
        raise DocumentError(f"{what}: {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{what}: not UTF-8: {exc}") from None
    if text.startswith("\ufeff"):
        raise DocumentError(f"{what}: not valid JSON: starts with a byte order mark")
    depth = nesting_depth(text)
    if depth > max_depth:
        raise DocumentError(f"{what}: nested {depth} deep, over the limit of {max_depth}")
    try:
        doc = json.loads(
            text,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
            object_pairs_hook=_object,
        )
    except RecursionError:  # only if max_depth is set above what the stack takes
        raise DocumentError(f"{what}: not valid JSON: nested too deep") from None
    except ValueError as exc:  # JSONDecodeError and the hooks' refusals
        first = (str(exc).splitlines() or [""])[0]
        raise DocumentError(f"{what}: not valid JSON: {first}") from None
    if not isinstance(doc, dict):
        raise DocumentError(f"{what}: not a JSON object but {_kind(doc)}")
    return doc


def _kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±Infinity) replaced by None, in dicts,
    lists and tuples at any depth; other values are returned as they are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps(value, **options)`` as strict JSON: non-finite floats become null."""
    return json.dumps(finite(value), allow_nan=False, **options)
