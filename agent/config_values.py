"""A config value as its key's type wants it, before msgspec checks it: the lax reading
the config had under pydantic, kept so that a file or an EnvironmentFile that worked
before an upgrade still works.

Environment values are always text, and YAML gives text for a quoted value
(``keep: "3"``). For a number or boolean key the text is stripped (spaces, a newline),
then read as Python reads it: ``int()`` for a whole number ("+3", "05", "1_000", "3.0"),
``float()`` for a number (".5", "1.", "1e3"), ASCII digits only; a boolean is one of
``true/false, yes/no, on/off, y/n, t/f, 1/0`` in any case. A whole float (``2.0``) for a
whole-number key is 2, as before; a YAML ``true`` for a number is refused (pydantic took it
for 1: a mistake that should show). What cannot be read
is a :class:`Refused` saying what the key expects ("a whole number 1..64").
Pure functions over plain values.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, NamedTuple

from msgspec import Meta

__all__ = ["BOOL_WORDS", "Refused", "bare", "coerce", "expects", "opaque"]

BOOL_WORDS = {
    **dict.fromkeys(("true", "yes", "on", "y", "t", "1"), True),
    **dict.fromkeys(("false", "no", "off", "n", "f", "0"), False),
}
# int(): a sign, digits with single underscores between them; pydantic also took "3.0"
_INT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_LONGEST = 100  # characters of a number worth reading (int() of 5000 digits is slow)


class Refused(NamedTuple):
    """A value its key cannot take: ``message`` says what the key expects."""

    message: str


def bare(annotation: Any) -> Any:
    """``annotation`` without Annotated and without ``| None``."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is not Literal and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return bare(rest[0])
    return annotation


class _Kind(NamedTuple):
    scalar: type | None  # int, float or bool
    words: tuple[Any, ...]  # Literal values
    bounds: str  # " 1..64", " >= 1" or ""


def _kind(annotation: Any) -> _Kind:
    plain = bare(annotation)
    members = [plain]
    if typing.get_origin(plain) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(plain) if m is not type(None)]
    scalar: type | None = None
    words: list[Any] = []
    bounds = ""
    for member in members:
        metas: list[Meta] = []
        while typing.get_origin(member) is Annotated:
            metas += [m for m in typing.get_args(member)[1:] if isinstance(m, Meta)]
            member = typing.get_args(member)[0]
        if typing.get_origin(member) is Literal:
            words += typing.get_args(member)
        elif member in (int, float, bool):
            scalar = member
            for meta in metas:
                if meta.ge is not None and meta.le is not None:
                    bounds = f" {meta.ge}..{meta.le}"
    return _Kind(scalar, tuple(words), bounds)


def opaque(annotation: Any) -> bool:
    """Whether msgspec's words for a wrong value of ``annotation`` would be opaque: a
    union of words and a number (``Literal["auto"] | Annotated[int, Meta(ge=1)]``)."""
    kind = _kind(annotation)
    return bool(kind.scalar and kind.words)


def expects(annotation: Any) -> str:
    """What a key of type ``annotation`` takes, in words ("auto or a whole number 1..64"),
    or "" for a key that is not a number, a boolean or a choice of words."""
    return _what(_kind(annotation))


def _what(kind: _Kind) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false"}
    what = names[kind.scalar] + kind.bounds if kind.scalar else ""
    if kind.scalar is bool:
        what += " (or yes/no, on/off, 1/0)"
    words = ", ".join(str(w) for w in kind.words)
    if words and what:
        return f"{words} or {what}"
    return f"one of {words}" if words else what


def _number(text: str, scalar: type) -> int | float | None:
    if len(text) > _LONGEST or not text.isascii():
        return None
    if scalar is int:
        return int(text.partition(".")[0]) if _INT.fullmatch(text) else None
    try:
        return float(text)  # ".5", "1.", "1e3", "1_000.5", "inf" (bounds refuse it)
    except ValueError:
        return None


def coerce(annotation: Any, value: Any) -> Any:
    """``value`` read for a key of type ``annotation``; a Refused when it cannot be;
    ``value`` itself when the key is not a number, a boolean or a choice of words
    (msgspec checks those)."""
    kind = _kind(annotation)
    if kind.scalar is None and not any(type(w) is int for w in kind.words):
        # text or a choice of words: msgspec names the choices ("Invalid enum value")
        stripped = value.strip() if isinstance(value, str) else None
        return stripped if stripped is not None and stripped in kind.words else value
    if isinstance(value, str):
        text = value.strip()
        if text in kind.words:
            return text
        if kind.scalar is bool:
            found = BOOL_WORDS.get(text.lower())
            return Refused(f"{_shown(value)} is not {_what(kind)}") if found is None else found
        scalar = kind.scalar or (int if any(type(w) is int for w in kind.words) else None)
        number = _number(text, scalar) if scalar else None
        if number is None:
            return Refused(f"{_shown(value)} is not {_what(kind)}")
        return number
    if isinstance(value, bool):
        # pydantic took true for 1; a boolean where a number belongs is a mistake to show
        numeric = kind.scalar in (int, float) or any(type(w) is int for w in kind.words)
        return Refused(f"{str(value).lower()} is not {_what(kind)}") if numeric else value
    if isinstance(value, float) and value.is_integer() and kind.scalar is not float:
        if kind.scalar is int or any(type(w) is int for w in kind.words):
            return int(value)
        if kind.scalar is bool and value in (0, 1):
            return bool(value)
    if type(value) is int and kind.scalar is bool and value in (0, 1):
        return bool(value)
    return value


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")
