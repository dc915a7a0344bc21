"""What the typed documents (config, manifests, control replies) share: msgspec's
validation error read once, into a key path and a message a person can act on.

msgspec says ``Expected `int` >= 1 - at `$.files[0].size``` and, for a rule raised in a
``__post_init__`` or for a missing or unknown field, puts the key into the message
(``Object missing required field `path```). :func:`locate` turns every one of these
into ``(("files", 0, "size"), "Expected `int` >= 1")``; :func:`dotted` prints the path
with a key of the document's own quoted, so a hostile document cannot write line breaks
or escape sequences to a terminal. A pattern registered with :func:`rule_pattern` is told as
its rule ("letters, digits, ...") instead of the regular expression.

Light on purpose: ``re`` only, imported on the ``status``/``check-config`` path.
"""

from __future__ import annotations

import re

__all__ = ["dotted", "encodes", "locate", "rule_pattern", "whole"]

Path = tuple[str | int, ...]

# "<message> - at `$.a[0].b`"; the message itself may hold backticks (a key of the
# document's own), so the path is taken from the end.
_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_FIELD = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<key>.*)`$", re.DOTALL
)
# a rule raised as ValueError("<key>: <problem>") or ("<key>[N]: <problem>")
_KEY_FIRST = re.compile(
    r"^(?P<key>[a-z_][a-z0-9_]*)(?:\[(?P<index>\d+)\])?: (?P<msg>.*)$", re.DOTALL
)
_REGEX = re.compile(r"^Expected `str` matching regex (?P<regex>'.*'|\".*\")$", re.DOTALL)

_RULES: dict[str, str] = {}  # repr(pattern) as msgspec shows it -> the rule in words


def encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate such as ``"\\ud800"``, which
    JSON and YAML escapes can make and msgspec takes, but nothing can write out)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def whole(regex: str) -> str:
    """``regex`` matching the whole text: msgspec uses Python's ``re.search``, where a
    final ``$`` also matches before a trailing newline ("pi-01\\n" as a device id)."""
    return regex[:-1] + r"\Z" if regex.endswith("$") else regex


def rule_pattern(regex: str, rule: str) -> str:
    """``whole(regex)``, remembered with ``rule`` (the same thing in words: "letters,
    digits, '.', '_' and '-', starting with a letter or digit"), which :func:`locate`
    gives instead of msgspec's "Expected `str` matching regex '...'"."""
    full = whole(regex)
    _RULES[repr(full)] = rule
    return full


def locate(error: Exception, fields: frozenset[str] | None = None) -> tuple[Path, str]:
    """The key path and the message of msgspec's ValidationError ``error``.

    The path is relative to the document converted: keys as text, list positions as
    ints, a dict's own key as ``"[...]"`` (msgspec does not say which). An unknown field
    gives ``(..., key), "unknown field"``; a missing one ``(..., key), "required"``. A
    rule's ``"key: problem"`` (msgspec places a ``__post_init__`` error at the struct)
    is moved to its key when ``key`` is in ``fields`` (any lower-case name when
    ``fields`` is None). Never raises.
    """
    text = str(error)
    match = _AT.match(text)
    message, steps = (match["msg"], match["path"]) if match else (text, "")
    path: list[str | int] = []
    for key, index in _STEP.findall(steps):
        if key:
            path.append(key)
        else:
            path.append(int(index) if index.isdigit() else "[...]")
    field = _FIELD.match(message)
    keyed = _KEY_FIRST.match(message)
    if field:
        path.append(field["key"])
        message = "unknown field" if field["what"].startswith("contains") else "required"
    elif keyed and (fields is None or keyed["key"] in fields):
        path.append(keyed["key"])
        if keyed["index"] is not None:
            path.append(int(keyed["index"]))
        message = keyed["msg"]
    regex = _REGEX.match(message)
    if regex and regex["regex"] in _RULES:
        message = f"must be {_RULES[regex['regex']]}"
    return tuple(path), message


def dotted(path: Path) -> str:
    """A key path for a message (``files[1].name``: positions as ``[N]``); a key that is
    not a plain name (control characters, dots, brackets, quotes) is shown quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "[...]":
            text += part
        else:
            plain = part.isprintable() and not any(c in part for c in ".[]'\"`\\ ")
            shown = part if plain and part else repr(part[:200])
            text += f".{shown}" if text else shown
    return text
