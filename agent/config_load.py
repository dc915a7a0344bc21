"""Reading the config: the file, its YAML with the line of every key, and the
``EDGE_AGENT_<SECTION>_<KEY>`` environment overrides.

The file is read only if it is a regular file of at most ``MAX_CONFIG_BYTES``; the YAML
is parsed once, its node tree giving the line of every key path (for error messages)
and duplicate keys; an environment variable becomes the origin of the key it sets.
Validation of what was read is agent/config.py's (the sections: agent/config_validate.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import yaml

from agent.errors import ConfigError
from agent.structs import dotted as _dotted

ENV_PREFIX = "EDGE_AGENT_"
# A config is a few kilobytes; a bigger file is something else (a disk image, a log), and
# reading it whole could take the memory of a small board.
MAX_CONFIG_BYTES = 1024 * 1024


class Origin(NamedTuple):
    """Where a value came from, for error messages."""

    text: str


def _origins_from_yaml(
    node: yaml.Node, file: str
) -> tuple[dict[tuple[str, ...], Origin], list[str]]:
    """Map every key path of a composed YAML document to its line; report duplicate keys."""
    origins: dict[tuple[str, ...], Origin] = {}
    problems: list[str] = []

    visited: set[int] = set()

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        if id(n) in visited:  # an alias met again (or one that refers to itself)
            return
        visited.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in n.value:
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                dotted = _dotted(path + (key,))
                if key in seen:
                    problems.append(f"{file}:{line}: {dotted}: duplicate key")
                seen.add(key)
                origins[path + (key,)] = Origin(f"{file}:{line}")
                walk(value_node, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for index, item in enumerate(n.value):
                origins[path + (str(index),)] = Origin(f"{file}:{item.start_mark.line + 1}")
                walk(item, path + (str(index),))

    walk(node, ())
    return origins, problems


def _env_value(raw: str) -> Any:
    # Scalars stay strings and validation reads them by the key's type (" 300\n" -> 300,
    # "yes" -> True: agent.config_values), so "0123" stays a device id; lists and maps
    # are YAML flow style.
    if raw.lstrip().startswith(("[", "{")):
        return yaml.safe_load(raw)
    return raw


def _yaml_problem(exc: yaml.YAMLError | ValueError) -> str:
    """One line for a YAML error: PyYAML's own text spans several lines (context, a
    caret); a ValueError comes from a value that parses but cannot be built (a
    5000-digit number, month 13)."""
    if isinstance(exc, ValueError):
        return str(exc).split(";")[0]
    return str(getattr(exc, "problem", None) or exc).splitlines()[0]


def apply_env(
    data: dict[str, Any],
    env: Mapping[str, str],
    origins: dict[tuple[str, ...], Origin],
    sections: Collection[str],
) -> None:
    """Put the ``EDGE_AGENT_<SECTION>_<KEY>`` variables of ``env`` into ``data``, each
    variable the origin of its key. Raises ConfigError for a value that is not YAML."""
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or section == "pipelines" or not key:
            continue  # other EDGE_AGENT_* variables are not config
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the YAML error for this section is reported by validation
        try:
            target[key] = _env_value(raw)
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(
                [f"{var}: {section}.{key}: not valid YAML: {_yaml_problem(exc)}"]
            ) from exc
        origins[(section, key)] = Origin(var)


def read_yaml(text: str, file: str) -> tuple[Any, dict[tuple[str, ...], Origin]]:
    """The values of the YAML ``text`` and the line of every key path. Raises ConfigError
    (not YAML, nested too deeply, not a mapping, a duplicate key)."""
    try:  # the reader refuses control characters (NUL, ESC) already here
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: not valid YAML: {_yaml_problem(exc)}"]) from exc
    try:  # one parse: the node tree gives the lines, the same tree gives the values
        node = loader.get_single_node()
        data: Any = {} if node is None else loader.construct_document(node)
    except RecursionError:
        raise ConfigError([f"{file}: YAML nested too deeply"]) from None
    except (yaml.YAMLError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        raise ConfigError([f"{where}: not valid YAML: {_yaml_problem(exc)}"]) from exc
    finally:
        loader.dispose()
    origins: dict[tuple[str, ...], Origin] = {}
    if node is not None:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError([f"{file}:1: the configuration must be a mapping of sections"])
        origins, problems = _origins_from_yaml(node, file)
        if problems:
            raise ConfigError(problems)
    return data, origins


def read_text(path: Path) -> str:
    """The config file's text. Raises ConfigError, also for what is not a regular file
    (a FIFO nobody writes to would block for ever) and for a file over
    ``MAX_CONFIG_BYTES``."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            return _read_regular(file, path).decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            [
                f"{path}: config file not found; name one with --config PATH or "
                "$EDGE_AGENT_CONFIG (provisioning/install.sh writes one; `edge-agent demo` "
                "needs none)"
            ]
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc


def _read_regular(file: BinaryIO, path: Path) -> bytes:
    mode = os.fstat(file.fileno()).st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError([f"{path}: is a folder; name the config file in it"])
    if not stat.S_ISREG(mode):
        raise ConfigError([f"{path}: not a regular file; name a YAML config file"])
    data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a config file"]
        )
    return data
