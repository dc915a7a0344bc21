"""Validating one section of the config: every wrong key, else the first rule broken.

Values are first read by the key's type (agent/config_values.py); msgspec then builds
the section's struct. msgspec stops at the first problem, so on a failure each key is
checked alone and worded for its type (its errors read into a key path by
agent/structs.py). Also here: text that is not valid Unicode, a ``source``'s kind by its
``type``, and the ``dec_hook`` that builds paths. No I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from agent.config_sources import SOURCE_TYPES, SOURCES, CameraSource, SourceConfig
from agent.config_values import Refused, coerce, expects, opaque
from agent.structs import encodes, locate


def fields_of(kind: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """The fields of a config struct by key, in declaration order."""
    return {field.name: field for field in msgspec.structs.fields(kind)}


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec's ``dec_hook`` for the config: builds paths (refusing ``""``, which would
    silently mean the current folder, and NUL)."""
    if kind is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise TypeError(f"Expected a path, got `{type(value).__name__}`")
        if value == "" or "\x00" in value:
            raise ValueError("must be a path (not empty, no NUL byte)")
        return Path(value)
    raise NotImplementedError(f"no conversion to {kind!r}")


Located = tuple[tuple[str | int, ...], str]


def _field_problem(section: str, field: msgspec.structs.FieldInfo, error: Exception) -> Located:
    """msgspec's error for one key, worded for the key's type."""
    path, message = locate(error)
    if not path and opaque(field.type):
        message = f"must be {expects(field.type)}"  # runtime.threads: auto or 1..64
    elif not path and message.startswith("Invalid enum value"):
        message += f"; {expects(field.type)}"
    return (section, field.name, *path), message


def read_section(
    name: str, kind: type[msgspec.Struct], value: Any
) -> msgspec.Struct | list[Located]:
    """The section ``value`` validated as ``kind``, or its problems: every key that is
    wrong (a value refused by its type or its bounds), else the first rule broken.
    msgspec stops at the first problem, so on a failure each key is checked alone."""
    fields = fields_of(kind)
    problems: list[Located] = []
    error: Exception = ValueError("no error")
    if isinstance(value, dict):
        value = dict(value)
        for key, item in value.items():
            read = coerce(fields[key].type, item)
            if isinstance(read, Refused):
                problems.append(((name, key), read.message))
            value[key] = read
    if not problems:
        try:
            return msgspec.convert(value, kind, dec_hook=decode_hook)
        except msgspec.ValidationError as exc:
            error = exc
        except UnicodeError:  # already refused by not_unicode; here in case
            return [((name,), "text that is not valid Unicode")]
        if not isinstance(value, dict):
            return [((name, *locate(error)[0]), locate(error)[1])]
    refused = {path[1] for path, _ in problems}
    for key, item in value.items():
        if key in refused:
            continue
        try:
            msgspec.convert(item, fields[key].type, dec_hook=decode_hook)
        except msgspec.ValidationError as exc:
            problems.append(_field_problem(name, fields[key], exc))
    if problems:
        return sorted(problems, key=lambda p: list(value).index(p[0][1]))
    path, message = locate(error, frozenset(fields))  # a rule, or a required key missing
    return [((name, *path), message)]


def not_unicode(data: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The key paths of text (a key or a value) that does not encode as UTF-8: a lone
    surrogate ("\ud800", from a YAML escape) passes msgspec and fails later, where the
    text is written (a path, a topic, a log line)."""
    found: list[tuple[str | int, ...]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, path)]
    seen: set[int] = set()
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and not encodes(item):
                found.append(where)
        elif isinstance(item, (dict, list)) and id(item) not in seen:
            seen.add(id(item))  # an alias met again (or one that refers to itself)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, value in pairs:
                shown = key if isinstance(key, (str, int)) else repr(key)
                if isinstance(key, str) and not key.isascii() and not encodes(key):
                    found.append(where)  # the mapping that has the key
                    continue
                stack.append((value, (*where, shown)))
    return sorted(found, key=str)


def source_kind(value: Any) -> type[SourceConfig] | str:
    """The struct for a ``source`` section, or the problem with its ``type``."""
    if not isinstance(value, dict):
        return CameraSource  # validation reports the value that is not a mapping
    if "type" not in value:
        return f"missing; one of {', '.join(SOURCE_TYPES)}"
    tag = value["type"]
    kind = SOURCES.get(tag.strip()) if isinstance(tag, str) else None
    if kind is None:
        return f"unknown type {tag!r}; one of {', '.join(SOURCE_TYPES)}"
    return kind
