"""The configuration reference (docs/configuration.md), generated from the config models.

``render()`` walks :class:`agent.config.Config`: one table per section (key path, type,
default, description, all taken from the msgspec struct fields), one per source type, then
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

import msgspec
import yaml
from msgspec import Meta
from msgspec.structs import FieldInfo

from agent.config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    MAX_CONFIG_BYTES,
    SOURCES,
    Config,
    fields_of,
)

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

PIPELINES_NOTE = (
    "A pipeline's `model`, `source` and `results` take the keys of the top-level "
    "sections of those names (a `source.type` picks its kind) and its `cascade` those "
    "of the top-level `cascade`. Its results go to `edge/<device>/results/<name>`; each "
    "model has its own store (the one `store.dir` holds keeps its model, the others are "
    "in `store.dir/models/<model>/`) and its own desired state (docs/protocol.md)."
)

# The cross-key rules of Config._requirements, which no single field's schema shows.
RULES = (
    "`model.name` is required when `registry.url` is set.",
    "`mqtt.cert` and `mqtt.key` go together.",
    "`mqtt.ca`, `mqtt.cert` and `mqtt.key` need an `mqtts://` `mqtt.url`.",
    "`mqtt.password_file` and `mqtt.password_credential` exclude each other.",
    "A password (either of them) needs `mqtt.username`.",
    "`pipelines` excludes the top-level `model`, `source`, `results` and `cascade`; a "
    "config without it has one pipeline named `main` of those.",
    "Pipeline names are unique; every pipeline's `model.name` (and its cascade's) is "
    "required; a model followed by several pipelines has one `channel`.",
    "A cascade's `model.name` differs from its pipeline's (the top-level cascade's from "
    "`model.name`).",
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


def _metas(annotation: Any) -> list[Meta]:
    """The constraints and description of a field: the Meta of its Annotated type, and
    of the one member of ``X | None`` (not those of a list's items)."""
    metas: list[Meta] = []
    if typing.get_origin(annotation) is Annotated:
        annotation, *extras = typing.get_args(annotation)
        metas += [m for m in extras if isinstance(m, Meta)]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Annotated:
                metas += [m for m in typing.get_args(arg)[1:] if isinstance(m, Meta)]
    return metas


def description(field: FieldInfo) -> str:
    """The field's description (its Meta's), or ``""``."""
    return next((m.description for m in _metas(field.type) if m.description), "")


def _bounds(metas: list[Meta]) -> str:
    parts = []
    for meta in metas:
        if meta.gt is not None:
            parts.append(f"> {meta.gt}")
        if meta.ge is not None:
            parts.append(f"≥ {meta.ge}")
        if meta.lt is not None:
            parts.append(f"< {meta.lt}")
        if meta.le is not None:
            parts.append(f"≤ {meta.le}")
        if meta.min_length:
            parts.append("not empty" if meta.min_length == 1 else f"length ≥ {meta.min_length}")
        if meta.max_length is not None:
            parts.append(f"length ≤ {meta.max_length}")
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
        names = list(dict.fromkeys(_type_name(a) for a in args if a is not type(None)))
        return " or ".join(names)
    if origin is list or origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return "mapping"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def field_type(field: FieldInfo) -> str:
    """The type column: the value's type, then its bounds (``integer, ≥ 1``)."""
    bounds = _bounds(_metas(field.type))
    name = _type_name(field.type)
    return f"{name}, {bounds}" if bounds else name


def field_default(field: FieldInfo) -> str:
    """The default column: the value, ``unset``, ``required`` or ``computed``."""
    if field.default_factory is not msgspec.NODEFAULT:
        factory: Any = field.default_factory
        if factory in (list, dict):
            return "`[]`" if factory is list else "`{}`"
        if isinstance(factory, type) and issubclass(factory, msgspec.Struct):
            return "see its section"
        return "computed (see description)"
    if field.default is msgspec.NODEFAULT:
        return "**required**"
    if field.default is None:
        return "unset"
    if field.default == ():
        return "`[]`"
    return f"`{_literal(field.default)}`"


def _wrap(text: str) -> list[str]:
    """A paragraph as lines of at most 88 characters (URLs and code never broken)."""
    return textwrap.wrap(text, 88, break_long_words=False, break_on_hyphens=False)


def _rows(prefix: str, model: type[msgspec.Struct]) -> Iterator[str]:
    fields = fields_of(model)
    names = sorted(fields, key=lambda n: n != "type")  # a source's type first
    for name in names:
        field = fields[name]
        yield (
            f"| `{prefix}.{name}` | {_cell(field_type(field))} | {_cell(field_default(field))} "
            f"| {_cell(description(field))} |"
        )


def _table(prefix: str, model: type[msgspec.Struct]) -> list[str]:
    return [
        "| key | type | default | description |",
        "|---|---|---|---|",
        *_rows(prefix, model),
    ]


def source_types() -> list[type[msgspec.Struct]]:
    """The structs of the ``source`` section's kinds, in the config's order."""
    return list(SOURCES.values())


def _section_struct(field: FieldInfo) -> type[msgspec.Struct] | None:
    """The struct of a section field (``None`` for ``source``, a union of kinds): of
    ``cascade`` (a struct or unset) and of ``pipelines`` (a list of them) too."""
    annotation = typing.get_args(field.type)[0]  # Annotated[Struct, Meta(...)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple or (origin in (Union, types.UnionType) and type(None) in args):
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    return None


def all_models() -> list[type[msgspec.Struct]]:
    """Config, every section struct and every source struct: what the reference covers."""
    models: list[type[msgspec.Struct]] = [Config]
    for field in fields_of(Config).values():
        struct = _section_struct(field)
        if struct is not None:
            models.append(struct)
    return models + source_types()


def _tag(kind: type[msgspec.Struct]) -> tuple[str, str]:
    """A source kind's ``type`` value and its description."""
    field = fields_of(kind)["type"]
    return str(field.default), description(field)


def _source_section(name: str, field: FieldInfo) -> list[str]:
    default_factory: Any = field.default_factory
    default_type = _tag(default_factory)[0]
    kinds = source_types()
    lines = [
        f"## `{name}`",
        "",
        *_wrap(
            f"{description(field)} `{name}.type` picks the kind of source (default "
            f"`{default_type}`); each kind has its own keys, and a key of another kind is "
            "refused."
        ),
        "",
        "| type | what |",
        "|---|---|",
    ]
    for kind in kinds:
        tag, what = _tag(kind)
        lines.append(f"| [`{tag}`](#source-type-{tag}) | {_cell(what)} |")
    for kind in kinds:
        tag = _tag(kind)[0]
        lines += ["", f"### source type {tag}", "", *_table(name, kind)]
    return lines


def _environment() -> list[str]:
    sections = ", ".join(f"`{s.upper()}`" for s in fields_of(Config))
    bullets = [
        f"The first word after `{ENV_PREFIX}` is the section ({sections}); the rest, "
        "lower-cased, is the key: `EDGE_AGENT_REGISTRY_POLL_INTERVAL_S=60` sets "
        "`registry.poll_interval_s`.",
        "Values are text read by the key's type, with surrounding spaces and line "
        "breaks dropped: a whole number as Python's `int()` reads it (`05`, `+3`, "
        "`1_000`, `3.0`), a number as `float()` does (`.5`, `1e3`), a boolean as one of "
        "`true/false`, `yes/no`, `on/off`, `y/n`, `t/f`, `1/0` in any case (quoted "
        "numbers and booleans in the file are read the same way); a value that starts "
        "with `[` or `{` is read as YAML flow style: "
        "`EDGE_AGENT_DEVICE_GROUPS='[door, canary]'`.",
        "The override is validated with the file: a bad value or an unknown key is "
        "reported with the variable's name in place of the file's line "
        "(``EDGE_AGENT_STORE_KEEP: store.keep: 'many' is not a whole number``).",
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
            "line it came from (``config.yaml:12: store.keep: Expected `int` >= 1``). "
            "Every wrong key is listed; of the rules between keys (such as "
            "`mqtt.cert` and `mqtt.key` going together) the first one broken is reported: "
            "fix it and validate again. Text that is not valid Unicode (a lone "
            "surrogate escape such as `\\ud800`) is refused. An "
            "invalid configuration exits 78. Every key has a default except "
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
    fields = fields_of(Config)
    lines += [f"| [`{name}`](#{name}) | {_cell(description(f))} |" for name, f in fields.items()]
    for name, field in fields.items():
        lines.append("")
        struct = _section_struct(field)
        if struct is not None:
            prefix = f"{name}[]" if name == "pipelines" else name
            lines += [
                f"## `{name}`",
                "",
                *_wrap(description(field)),
                "",
                *_table(prefix, struct),
            ]
            if name == "pipelines":  # its cascade's keys are the top-level cascade's
                lines += ["", *_wrap(PIPELINES_NOTE)]
        else:
            lines += _source_section(name, field)
    lines += ["", "## Rules between keys", ""]
    lines += [line for rule in RULES for line in _bullet(rule)]
    lines += ["", *_environment()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
