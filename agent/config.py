"""Typed configuration, validated once at start.

``load_config`` reads the YAML file, applies ``EDGE_AGENT_<SECTION>_<KEY>``
environment overrides and validates everything (docs/configuration.md is generated
from these structs by ``agent.configdoc``: every field needs its description).
Unknown keys are refused. Every error names the key path and where the value came
from (``config.yaml:12`` or the environment variable). Validation does no I/O;
``agent.preflight`` checks what a valid config refers to (files, folders, libraries).

The sections are msgspec structs (:mod:`agent.config_sections`, the sources in
:mod:`agent.config_sources`; all re-exported here): importing and validating them
takes a few milliseconds and little memory on a small board. Values are first read by
the key's type as the config was read before (:mod:`agent.config_values`: " 3\\n" and
"yes" from the environment); every wrong key is reported, and of the rules between keys
the first one broken; msgspec's errors are read by :mod:`agent.structs`.
"""

import os
import stat
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NamedTuple

import msgspec
import yaml
from msgspec import Meta

from agent.config_pipelines import (
    CascadeConfig,
    PipelineConfig,
    PipelineReader,
    between_pipelines,
    pipeline_list,
)
from agent.config_sections import (
    HA_LABEL_PATTERN,
    MODEL_NAME_PATTERN,
    SNAPSHOT_MAX_KB,
    SUN_PATH_MAX,
    ControlConfig,
    DeviceConfig,
    FilePath,
    HomeAssistantConfig,
    MetricsConfig,
    ModelConfig,
    MqttConfig,
    PrivacyConfig,
    RegistryConfig,
    ResultsConfig,
    RuntimeConfig,
    Section,
    StoreConfig,
    TelemetryConfig,
    UpdateConfig,
    check_url,
    ha_slug,
)
from agent.config_sources import (
    SOURCE_TYPES,
    SOURCES,
    CameraSource,
    ImagesSource,
    MjpegSource,
    Picamera2Source,
    RtspSource,
    SerialSource,
    SourceConfig,
    SyntheticSource,
    UdpSource,
    VideoSource,
)
from agent.config_values import Refused, coerce, expects, opaque
from agent.errors import ConfigError
from agent.structs import dotted, encodes, locate

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "HA_LABEL_PATTERN",
    "MAX_CONFIG_BYTES",
    "MODEL_NAME_PATTERN",
    "SECTIONS",
    "SNAPSHOT_MAX_KB",
    "SOURCES",
    "SOURCE_TYPES",
    "SUN_PATH_MAX",
    "CameraSource",
    "CascadeConfig",
    "Config",
    "ControlConfig",
    "DeviceConfig",
    "FilePath",
    "HomeAssistantConfig",
    "ImagesSource",
    "MetricsConfig",
    "MjpegSource",
    "ModelConfig",
    "MqttConfig",
    "Picamera2Source",
    "PipelineConfig",
    "PrivacyConfig",
    "RegistryConfig",
    "ResultsConfig",
    "RtspSource",
    "RuntimeConfig",
    "SerialSource",
    "SourceConfig",
    "StoreConfig",
    "SyntheticSource",
    "TelemetryConfig",
    "UdpSource",
    "UpdateConfig",
    "VideoSource",
    "as_dict",
    "check_url",
    "config_from_dict",
    "decode_hook",
    "fields_of",
    "ha_slug",
    "load_config",
    "parse_config",
    "pipeline_list",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.yaml")
ENV_PREFIX = "EDGE_AGENT_"
# A config is a few kilobytes; a bigger file is something else (a disk image, a log), and
# reading it whole could take the memory of a small board.
MAX_CONFIG_BYTES = 1024 * 1024


class Config(Section, frozen=True):
    device: Annotated[DeviceConfig, Meta(description="This device.")] = msgspec.field(
        default_factory=DeviceConfig
    )
    registry: Annotated[RegistryConfig, Meta(description="Model registry.")] = msgspec.field(
        default_factory=RegistryConfig
    )
    model: Annotated[ModelConfig, Meta(description="Model to follow.")] = msgspec.field(
        default_factory=ModelConfig
    )
    store: Annotated[StoreConfig, Meta(description="Local model store.")] = msgspec.field(
        default_factory=StoreConfig
    )
    runtime: Annotated[RuntimeConfig, Meta(description="Interpreter settings.")] = msgspec.field(
        default_factory=RuntimeConfig
    )
    source: Annotated[
        SourceConfig, Meta(description="Input stream; its keys depend on source.type.")
    ] = msgspec.field(default_factory=CameraSource)
    results: Annotated[ResultsConfig, Meta(description="Result publishing.")] = msgspec.field(
        default_factory=ResultsConfig
    )
    mqtt: Annotated[MqttConfig, Meta(description="MQTT broker.")] = msgspec.field(
        default_factory=MqttConfig
    )
    telemetry: Annotated[TelemetryConfig, Meta(description="Telemetry and outbox.")] = (
        msgspec.field(default_factory=TelemetryConfig)
    )
    update: Annotated[UpdateConfig, Meta(description="Update gate, probation and polling.")] = (
        msgspec.field(default_factory=UpdateConfig)
    )
    control: Annotated[
        ControlConfig, Meta(description="Local control socket of the running agent.")
    ] = msgspec.field(default_factory=ControlConfig)
    privacy: Annotated[
        PrivacyConfig, Meta(description="What the agent may send of what it sees.")
    ] = msgspec.field(default_factory=PrivacyConfig)
    metrics: Annotated[MetricsConfig, Meta(description="Prometheus endpoint (off by default).")] = (
        msgspec.field(default_factory=MetricsConfig)
    )
    homeassistant: Annotated[
        HomeAssistantConfig, Meta(description="Home Assistant MQTT discovery.")
    ] = msgspec.field(default_factory=HomeAssistantConfig)
    cascade: Annotated[
        CascadeConfig | None,
        Meta(description="A second model on crops of the single model's detections."),
    ] = None
    pipelines: Annotated[
        tuple[PipelineConfig, ...],
        Meta(
            description="Several pipelines (1..8), each with its own model, source, results "
            "and cascade; instead of the top-level model, source, results and cascade."
        ),
    ] = ()

    @property
    def control_socket(self) -> Path:
        """The control socket's path: control.socket, else control.sock beside store.dir.

        The daemon and the CLI both derive it from the same config file.
        """
        return self.control.socket or self.store.dir.parent / "control.sock"

    def pipeline_list(self) -> tuple[PipelineConfig, ...]:
        """The pipelines: ``pipelines``, else one named ``main`` of the single model."""
        return pipeline_list(self)

    def __post_init__(self) -> None:
        """The rules between keys (listed in docs/configuration.md by agent.configdoc)."""
        if self.registry.url is not None and self.model.name is None and not self.pipelines:
            raise ValueError("model.name is required when registry.url is set")
        mqtt = self.mqtt
        if (mqtt.cert is None) != (mqtt.key is None):
            raise ValueError("mqtt.cert and mqtt.key go together")
        if mqtt.url and mqtt.url.startswith("mqtt://") and (mqtt.ca or mqtt.cert):
            raise ValueError("mqtt.ca, mqtt.cert and mqtt.key need an mqtts:// mqtt.url")
        if mqtt.password_file and mqtt.password_credential:
            raise ValueError("set mqtt.password_file or mqtt.password_credential, not both")
        if (mqtt.password_file or mqtt.password_credential) and not mqtt.username:
            raise ValueError("a password needs mqtt.username")
        if self.homeassistant.discovery and "." in self.device.id:
            raise ValueError(
                f"homeassistant.discovery: device.id {self.device.id!r} has a '.', which Home "
                "Assistant refuses in a discovery topic; give the device an id of letters, "
                "digits, _ and - (the broker's ACL matches topics on the id itself)"
            )
        length = len(os.fsencode(self.control_socket))
        if length > SUN_PATH_MAX:
            where = "" if self.control.socket else " (the default, beside store.dir)"
            raise ValueError(
                f"control.socket: {self.control_socket}{where} is {length} bytes, more than a "
                f"Unix socket path may have ({SUN_PATH_MAX}); set control.socket to a shorter "
                "path"
            )


SECTIONS = Config.__struct_fields__


def as_dict(config: msgspec.Struct) -> dict[str, Any]:
    """A config (or one section) as plain JSON-ready data: paths as text."""
    data: dict[str, Any] = msgspec.to_builtins(config, enc_hook=str)
    return data


def fields_of(kind: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """The fields of a config struct by key, in declaration order."""
    return {field.name: field for field in msgspec.structs.fields(kind)}


_SECTION_KINDS: dict[str, type[msgspec.Struct]] = {}


def _section_kinds(section: str) -> list[type[msgspec.Struct]]:
    if section == "source":
        return list(SOURCES.values())
    if not _SECTION_KINDS:  # on first use: resolving the annotations takes a few ms
        for name, field in fields_of(Config).items():
            _SECTION_KINDS[name] = typing.get_args(field.type)[0]
    return [_SECTION_KINDS[section]]


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


def _dotted(path: tuple[str | int, ...]) -> str:
    """A key path for a message (``device.groups[1]``), a key that is not plain quoted."""
    return dotted(path)


class _Origin(NamedTuple):
    """Where a value came from, for error messages."""

    text: str


def _origins_from_yaml(
    node: yaml.Node, file: str
) -> tuple[dict[tuple[str, ...], _Origin], list[str]]:
    """Map every key path of a composed YAML document to its line; report duplicate keys."""
    origins: dict[tuple[str, ...], _Origin] = {}
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
                origins[path + (key,)] = _Origin(f"{file}:{line}")
                walk(value_node, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for index, item in enumerate(n.value):
                origins[path + (str(index),)] = _Origin(f"{file}:{item.start_mark.line + 1}")
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


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], origins: dict[tuple[str, ...], _Origin]
) -> None:
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or section == "pipelines" or not key:
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
        origins[(section, key)] = _Origin(var)


Located = tuple[tuple[str | int, ...], str]


def _field_problem(section: str, field: msgspec.structs.FieldInfo, error: Exception) -> Located:
    """msgspec's error for one key, worded for the key's type."""
    path, message = locate(error)
    if not path and opaque(field.type):
        message = f"must be {expects(field.type)}"  # runtime.threads: auto or 1..64
    elif not path and message.startswith("Invalid enum value"):
        message += f"; {expects(field.type)}"
    return (section, field.name, *path), message


def _section(name: str, kind: type[msgspec.Struct], value: Any) -> msgspec.Struct | list[Located]:
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
        except UnicodeError:  # already refused by _not_unicode; here in case
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


def _not_unicode(data: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
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


def _source_kind(value: Any) -> type[SourceConfig] | str:
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


# ``pipelines`` and ``cascade``: read entry by entry with the sections' own reading
_PIPELINES = PipelineReader(_section, _source_kind)


def config_from_dict(
    data: Mapping[str, Any],
    file: str = "config",
    origins: Mapping[tuple[str, ...], _Origin] | None = None,
) -> Config:
    """Validate plain data (as YAML gives it) into a :class:`Config`. Raises ConfigError
    with one line per problem (every wrong key; of the rules between keys of a section,
    the first one broken): ``<where>: <key path>: <what>``,
    ``<where>`` the value's line in ``origins``, else ``file``."""
    lines = origins or {}

    def line(path: tuple[str | int, ...], message: str) -> str:
        loc = tuple(str(part) for part in path)
        where = file
        for depth in range(len(loc), 0, -1):  # nearest enclosing key that has a line
            if loc[:depth] in lines:
                where = lines[loc[:depth]].text
                break
        return f"{where}: {_dotted(path)}: {message}" if path else f"{where}: {message}"

    bad_text = _not_unicode(data)
    if bad_text:
        raise ConfigError([line(path, "text that is not valid Unicode") for path in bad_text])
    problems = [
        line((key if isinstance(key, str) else repr(key),), "unknown key")
        for key in data
        if key not in SECTIONS
    ]
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        if name not in data:
            continue
        value = data[name]
        if name in ("pipelines", "cascade"):
            parsed = (
                _PIPELINES.pipelines(value) if name == "pipelines" else _PIPELINES.cascade(value)
            )
            if isinstance(parsed, list):
                problems += [line(*problem) for problem in parsed]
            else:
                sections[name] = parsed
            continue
        kind: Any = _section_kinds(name)[0]
        if name == "source":
            kind = _source_kind(value)
            if isinstance(kind, str):
                problems.append(line((name, "type"), kind))
                continue
        if isinstance(value, dict):
            known = kind.__struct_fields__  # the keys (no field is renamed)
            unknown = [k for k in value if k not in known]
            if unknown:
                problems += [
                    line((name, k if isinstance(k, str) else repr(k)), "unknown key")
                    for k in unknown
                ]
                continue
        section = _section(name, kind, value)
        if isinstance(section, list):
            problems += [line(*problem) for problem in section]
        else:
            sections[name] = section
    if not problems:
        problems += [line(*problem) for problem in between_pipelines(data, sections)]
    if problems:
        raise ConfigError(problems)
    try:
        return Config(**sections)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{file}: {exc}"]) from None


def parse_config(
    text: str, file: str = "config.yaml", env: Mapping[str, str] | None = None
) -> Config:
    """Parse and validate config text. Raises ConfigError naming key paths and lines."""
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
    origins: dict[tuple[str, ...], _Origin] = {}
    if node is not None:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError([f"{file}:1: the configuration must be a mapping of sections"])
        origins, problems = _origins_from_yaml(node, file)
        if problems:
            raise ConfigError(problems)
    _apply_env(data, os.environ if env is None else env, origins)
    return config_from_dict(data, file, origins)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``. Raises ConfigError, also for what
    is not a regular file (a FIFO nobody writes to would block for ever) and for a file
    over ``MAX_CONFIG_BYTES``."""
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            text = _read_regular(file, path).decode("utf-8")
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
    return parse_config(text, str(path), env)


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
