"""The configuration reference (docs/configuration.md), generated from the config models.

``render()`` walks :class:`agent.config.Config`: one table per section (key path, type,
default, description, all taken from the pydantic fields), one per source type, then
how environment overrides work. It is pure (no I/O, no clock, no host name), so the
same models always give the same text, and ``tests/test_docs.py`` fails when the
committed file differs. Regenerate with::

    python -m agent.configdoc > docs/configuration.md
"""

from __future__ import annotations

import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, MAX_CONFIG_BYTES, Config

REGENERATE = "python -m agent.configdoc > docs/configuration.md"

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}

# A short, complete config that the tests load: what most devices set.
EXAMPLE = """\
device:
  id: pi-door-01              # default: the hostname
  groups: [door, canary]
registry:
  url: https://models.example.com/   # or file:///srv/registry
  public_key: /etc/edge-agent/registry.pub
model:
  name: person-detector
  channel: stable
runtime:
  accelerator: auto
source:
  type: camera
  device: /dev/video0
  fps: 15
mqtt:
  url: mqtts://broker.example.com:8883
  ca: /etc/edge-agent/tls/ca.pem
  cert: /etc/edge-agent/tls/device.pem
  key: /etc/edge-agent/tls/device.key
update:
  desired_public_key: /etc/edge-agent/deploy.pub
"""

# The cross-key rules of Config._requirements, which no single field's schema shows.
RULES = (
    "`model.name` is required when `registry.url` is set.",
    "`mqtt.cert` and `mqtt.key` go together.",
    "`mqtt.ca`, `mqtt.cert` and `mqtt.key` need an `mqtts://` `mqtt.url`.",
    "`mqtt.password_file` and `mqtt.password_credential` exclude each other.",
    "A password (either of them) needs `mqtt.username`.",
)


def _cell(text: str) -> str:
    """``text`` made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _literal(value: object) -> str:
    """A value as it is written in YAML: quoted when YAML would read it as another type."""
    if isinstance(value, str):
        if value == "" or yaml.safe_load(value) != value:
            return f'"{value}"'
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bounds(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, MinLen) and item.min_length > 0:
            parts.append("not empty" if item.min_length == 1 else f"length ≥ {item.min_length}")
        elif isinstance(item, MaxLen):
            parts.append(f"length ≤ {item.max_length}")
    return ", ".join(parts)


def _type_name(annotation: Any) -> str:
    """A reader's name for ``annotation``: ``path``, ``list of string``, one of ``a``, ``b``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        choices = [f"`{_literal(a)}`" for a in args]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def field_type(field: FieldInfo) -> str:
    """The type column: the value's type, then its bounds (``integer, ≥ 1``)."""
    bounds = _bounds(field.metadata)
    name = _type_name(field.annotation)
    return f"{name}, {bounds}" if bounds else name


def field_default(field: FieldInfo) -> str:
    """The default column: the value, ``unset``, ``required`` or ``computed``."""
    if field.default_factory is not None:
        factory: Any = field.default_factory
        if factory in (list, dict):
            return "`[]`" if factory is list else "`{}`"
        return "computed (see description)"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "unset"
    return f"`{_literal(field.default)}`"


def _wrap(text: str) -> list[str]:
    """A paragraph as lines of at most 88 characters (URLs and code never broken)."""
    return textwrap.wrap(text, 88, break_long_words=False, break_on_hyphens=False)


def _rows(prefix: str, model: type[BaseModel]) -> Iterator[str]:
    fields = model.model_fields
    names = sorted(fields, key=lambda n: n != "type")  # a source's type first
    for name in names:
        field = fields[name]
        yield (
            f"| `{prefix}.{name}` | {_cell(field_type(field))} | {_cell(field_default(field))} "
            f"| {_cell(field.description or '')} |"
        )


def _table(prefix: str, model: type[BaseModel]) -> list[str]:
    return [
        "| key | type | default | description |",
        "|---|---|---|---|",
        *_rows(prefix, model),
    ]


def source_types() -> list[type[BaseModel]]:
    """The source models of the ``source`` section's union, in the config's order."""
    annotation = Config.model_fields["source"].annotation
    return [a for a in typing.get_args(annotation) if isinstance(a, type)]


def all_models() -> list[type[BaseModel]]:
    """Config, every section model and every source model: what the reference covers."""
    models: list[type[BaseModel]] = [Config]
    for field in Config.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            models.append(annotation)
    return models + source_types()


def _source_section(name: str, field: FieldInfo) -> list[str]:
    default_factory: Any = field.default_factory
    default_type = default_factory.model_fields["type"].default if default_factory else None
    kinds = source_types()
    lines = [
        f"## `{name}`",
        "",
        *_wrap(
            f"{field.description} `{name}.type` picks the kind of source (default "
            f"`{default_type}`); each kind has its own keys, and a key of another kind is "
            "refused."
        ),
        "",
        "| type | what |",
        "|---|---|",
    ]
    for kind in kinds:
        tag = kind.model_fields["type"].default
        what = kind.model_fields["type"].description or ""
        lines.append(f"| [`{tag}`](#source-type-{tag}) | {_cell(what)} |")
    for kind in kinds:
        tag = kind.model_fields["type"].default
        lines += ["", f"### source type {tag}", "", *_table(name, kind)]
    return lines


def _environment() -> list[str]:
    sections = ", ".join(f"`{s.upper()}`" for s in Config.model_fields)
    bullets = [
        f"The first word after `{ENV_PREFIX}` is the section ({sections}); the rest, "
        "lower-cased, is the key: `EDGE_AGENT_REGISTRY_POLL_INTERVAL_S=60` sets "
        "`registry.poll_interval_s`.",
        "Values are text converted by the key's type (`60` to a number, `true` to a "
        "boolean); a value that starts with `[` or `{` is read as YAML flow style: "
        "`EDGE_AGENT_DEVICE_GROUPS='[door, canary]'`.",
        "The override is validated with the file: a bad value or an unknown key is "
        "reported with the variable's name in place of the file's line "
        "(`EDGE_AGENT_STORE_KEEP: store.keep: Input should be greater than or equal to 1`).",
        f"Variables whose first word is not a section (such as `{ENV_PREFIX}CONFIG`, "
        "the config file's path) are not configuration keys and are left alone here.",
    ]
    return [
        "## Environment overrides",
        "",
        *_wrap(
            f"A key directly under a section can be set from the environment as "
            f"`{ENV_PREFIX}<SECTION>_<KEY>`; the environment wins over the file."
        ),
        "",
        *(line for bullet in bullets for line in _bullet(bullet)),
    ]


def _bullet(text: str) -> list[str]:
    first, *rest = _wrap(text)
    return [f"- {first}", *(f"  {line}" for line in rest)]


def render() -> str:
    """The whole of docs/configuration.md, as Markdown ending in one newline."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from agent/config.py by `python -m agent.configdoc`; do not edit.",
        f"     Regenerate: {REGENERATE} -->",
        "",
        *_wrap(
            f"The agent reads one YAML file: `{DEFAULT_CONFIG_PATH}` unless `--config PATH` "
            f"or `${ENV_PREFIX}CONFIG` names another (a regular file of at most "
            f"{MAX_CONFIG_BYTES // 1024} KiB). It is validated once, at start (and on "
            "SIGHUP): unknown keys are refused, and every error names the key path and the "
            "line it came from (`config.yaml:12: store.keep: Input should be greater than or "
            "equal to 1`). An invalid configuration exits 78. Every key has a default except "
            "the few marked required; `edge-agent check-config --config PATH` validates a "
            "file and checks the files it names."
        ),
        "",
        "## Example",
        "",
        "```yaml",
        EXAMPLE.rstrip("\n"),
        "```",
        "",
        "## Sections",
        "",
        "| section | what |",
        "|---|---|",
    ]
    fields = Config.model_fields
    lines += [
        f"| [`{name}`](#{name}) | {_cell(f.description or '')} |" for name, f in fields.items()
    ]
    for name, field in fields.items():
        lines.append("")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [
                f"## `{name}`",
                "",
                *_wrap(field.description or ""),
                "",
                *_table(name, annotation),
            ]
        else:
            lines += _source_section(name, field)
    lines += ["", "## Rules between keys", ""]
    lines += [line for rule in RULES for line in _bullet(rule)]
    lines += ["", *_environment()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
