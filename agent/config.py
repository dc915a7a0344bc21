"""Typed configuration, validated once at start.

``load_config`` reads the YAML file, applies ``EDGE_AGENT_<SECTION>_<KEY>``
environment overrides and validates everything (docs/configuration.md is generated
from these structs by ``agent.configdoc``: every field needs its description).
Unknown keys are refused. Every error names the key path and where the value came
from (``config.yaml:12`` or the environment variable). Validation does no I/O;
``agent.preflight`` checks what a valid config refers to (files, folders, libraries).

The sections are msgspec structs (:mod:`agent.config_sections`, :mod:`agent.config_links`,
the sources in :mod:`agent.config_sources`; all re-exported here): importing and
validating them takes a few milliseconds and little memory on a small board. Values are
first read by the key's type as the config was read before (:mod:`agent.config_values`:
" 3\\n" and "yes" from the environment); every wrong key is reported, and of the rules
between keys the first one broken; msgspec's errors are read by :mod:`agent.structs`.

This module holds the whole config (:class:`Config`) and puts it together section by
section; reading the file, its YAML lines and the environment is
:mod:`agent.config_load`, validating one section :mod:`agent.config_validate`.
"""

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from agent.config_links import (
    HA_LABEL_PATTERN,
    SNAPSHOT_MAX_KB,
    SUN_PATH_MAX,
    ControlConfig,
    HomeAssistantConfig,
    MetricsConfig,
    MqttConfig,
    PrivacyConfig,
    TelemetryConfig,
    ha_slug,
)
from agent.config_load import (
    ENV_PREFIX,
    MAX_CONFIG_BYTES,
    Origin,
    apply_env,
    read_text,
    read_yaml,
)
from agent.config_pipelines import (
    CascadeConfig,
    PipelineConfig,
    PipelineReader,
    between_pipelines,
    pipeline_list,
)
from agent.config_sections import (
    MODEL_NAME_PATTERN,
    DeviceConfig,
    FilePath,
    ModelConfig,
    RegistryConfig,
    ResultsConfig,
    RuntimeConfig,
    Section,
    StoreConfig,
    UpdateConfig,
    check_url,
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
from agent.config_validate import decode_hook, fields_of, not_unicode, read_section, source_kind
from agent.errors import ConfigError
from agent.structs import dotted

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


_SECTION_KINDS: dict[str, type[msgspec.Struct]] = {}


def _section_kinds(section: str) -> list[type[msgspec.Struct]]:
    if section == "source":
        return list(SOURCES.values())
    if not _SECTION_KINDS:  # on first use: resolving the annotations takes a few ms
        for name, field in fields_of(Config).items():
            _SECTION_KINDS[name] = typing.get_args(field.type)[0]
    return [_SECTION_KINDS[section]]


def _dotted(path: tuple[str | int, ...]) -> str:
    """A key path for a message (``device.groups[1]``), a key that is not plain quoted."""
    return dotted(path)


# ``pipelines`` and ``cascade``: read entry by entry with the sections' own reading
_PIPELINES = PipelineReader(read_section, source_kind)


def config_from_dict(
    data: Mapping[str, Any],
    file: str = "config",
    origins: Mapping[tuple[str, ...], Origin] | None = None,
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

    bad_text = not_unicode(data)
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
            kind = source_kind(value)
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
        section = read_section(name, kind, value)
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
    data, origins = read_yaml(text, file)
    apply_env(data, os.environ if env is None else env, origins, SECTIONS)
    return config_from_dict(data, file, origins)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``. Raises ConfigError, also for what
    is not a regular file (a FIFO nobody writes to would block for ever) and for a file
    over ``MAX_CONFIG_BYTES``."""
    text = read_text(path)
    return parse_config(text, str(path), env)
