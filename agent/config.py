"""Typed configuration, validated once at start.

``load_config`` reads the YAML file, applies ``EDGE_AGENT_<SECTION>_<KEY>``
environment overrides and validates everything (docs/configuration.md is generated
from these models by ``agent.configdoc``: every field needs its description).
Unknown keys are refused. Every error names the key path and where the value came
from (``config.yaml:12`` or the environment variable). Validation does no I/O;
``agent.preflight`` checks what a valid config refers to (files, folders, libraries).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.errors import ConfigError
from agent.fleet.acl import NAME_PATTERN, check_group_name

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.yaml")
ENV_PREFIX = "EDGE_AGENT_"
# A config is a few kilobytes; a bigger file is something else (a disk image, a log), and
# reading it whole could take the memory of a small board.
MAX_CONFIG_BYTES = 1024 * 1024

# Model names become URL path segments and store folder names: keep them plain.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _path_text(value: object) -> object:
    if isinstance(value, str) and (value == "" or "\x00" in value):
        raise ValueError("must be a path (not empty, no NUL byte)")
    return value


# Every path in the config: "" would silently mean the current folder.
FilePath = Annotated[Path, BeforeValidator(_path_text)]


def check_url(value: str, schemes: tuple[str, ...]) -> str:
    """Raise ValueError unless ``value`` is a complete URL of one of ``schemes``."""
    parts = urllib.parse.urlsplit(value)  # ValueError for a broken IPv6 host
    if parts.scheme not in schemes:
        choices = [f"{scheme}://" for scheme in schemes]
        raise ValueError(f"must start with {', '.join(choices[:-1])} or {choices[-1]}")
    _ = parts.port  # ValueError for a port that is not a number in 0-65535
    if parts.scheme == "file":
        if not parts.path or parts.netloc not in ("", "localhost"):
            raise ValueError("a file:// URL needs an absolute path: file:///srv/registry")
    elif not parts.hostname:
        raise ValueError("has no host name")
    return value


def _auto_or(high: int) -> Any:
    def check(value: object) -> object:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)  # from an environment variable
        if value == "auto" or (type(value) is int and 1 <= value <= high):
            return value
        raise PydanticCustomError("auto_or_count", f"must be auto or a whole number 1..{high}")

    return check


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _group_name(value: str) -> str:
    problem = check_group_name(value)
    if problem is not None:
        # Without this, the device's subscription to its group's topic is refused (or,
        # with '+' or '#', is a wildcard) and it never connects, with nothing logged.
        raise PydanticCustomError(
            "group_name", "{problem} (it is a topic level)", {"problem": problem}
        )
    return value


class DeviceConfig(_Section):
    id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        pattern=NAME_PATTERN.pattern,
        description="Device id used in MQTT topics; defaults to the hostname.",
    )

    @field_validator("id")
    @classmethod
    def _not_groups(cls, value: str) -> str:
        if value == "groups":  # edge/groups/… is where group desired states live
            raise ValueError("'groups' is reserved for group topics; pick another device id")
        return value

    groups: list[Annotated[str, AfterValidator(_group_name)]] = Field(
        default_factory=list,
        description="Fleet groups this device is in; names like device ids (letters, digits, "
        "'.', '_', '-').",
    )


class RegistryConfig(_Section):
    url: str | None = Field(
        default=None,
        description="Registry base URL: http(s)://… or file:///path. Required by run and "
        "check-config.",
    )
    public_key: FilePath | None = Field(
        default=None,
        description="Ed25519 public key (PEM). When set, unsigned or badly signed releases "
        "and index.json are refused.",
    )
    public_keys: list[FilePath] = Field(
        default_factory=list,
        description="More trusted registry keys (PEM paths), trusted together with "
        "public_key: a signature by any of them is accepted. Rotate by listing old and new, "
        "re-signing, then dropping the old one; a key removed here is revoked.",
    )
    ca: FilePath | None = Field(
        default=None, description="CA bundle for an https registry with a private CA."
    )
    poll_interval_s: float = Field(default=300, gt=0, description="Seconds between polls.")
    max_download_mb: float = Field(
        default=500, gt=0, description="Largest file a release may list, in MB."
    )
    max_manifest_kb: float = Field(
        default=1024, gt=0, description="Largest manifest.json or index.json accepted, in KB."
    )
    timeout_s: float = Field(default=30, gt=0, description="Per-read timeout of registry requests.")
    connect_timeout_s: float = Field(
        default=5,
        gt=0,
        description="Longest wait for a connection to the registry (at most timeout_s). A "
        "registry that cannot be reached when a fetch begins fails it at once.",
    )
    deadline_s: float = Field(
        default=1800,
        gt=0,
        description="Overall deadline for fetching one file, retries included.",
    )
    retries: int = Field(
        default=5, ge=0, description="Retries of a broken transfer (resumed with Range)."
    )
    retry_backoff_s: float = Field(
        default=1.0,
        gt=0,
        description="First retry waits up to this long; doubles per retry, capped at 60 s.",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("http", "https", "file"))

    @property
    def trusted_keys(self) -> list[Path]:
        """public_key and public_keys: every key whose signature is accepted."""
        return [*([self.public_key] if self.public_key else []), *self.public_keys]


class ModelConfig(_Section):
    name: str | None = Field(
        default=None,
        pattern=MODEL_NAME_PATTERN,
        description="Model name in the registry. Required by run and check-config.",
    )
    channel: str = Field(
        default="stable", min_length=1, description="index.json channel to follow."
    )


class StoreConfig(_Section):
    dir: FilePath = Field(
        default=Path("/var/lib/edge-agent/models"), description="Where releases are kept."
    )
    keep: int = Field(default=3, ge=1, description="Releases kept on disk for rollback.")
    reserve_mb: float = Field(
        default=64, ge=0, description="Free space that must remain after a download, in MB."
    )


class RuntimeConfig(_Section):
    accelerator: Literal["auto", "edgetpu", "cpu"] = Field(
        default="auto", description="auto uses the Edge TPU when present, else the CPU variant."
    )
    edgetpu_device: str = Field(
        default="",
        pattern=r"^(|usb|pci)(:\d+)?$",
        description='Edge TPU to use: "", usb, usb:N, pci:N.',
    )
    edgetpu_library: str = Field(
        default="libedgetpu.so.1",
        min_length=1,
        description="The Edge TPU delegate library (a name the loader finds, or a path).",
    )
    threads: Annotated[int | Literal["auto"], BeforeValidator(_auto_or(64))] = Field(
        default=2,
        description="CPU threads of each interpreter (1..64), or auto: chosen with "
        "runtime.interpreters by a short calibration at model load.",
    )
    interpreters: Annotated[int | Literal["auto"], BeforeValidator(_auto_or(16))] = Field(
        default=1,
        description="Interpreters serving frames side by side (1..16), each of one thread "
        "when more than one, results kept in frame order; auto: chosen by a short "
        "calibration at model load. The Edge TPU keeps one.",
    )
    invoke_timeout_ms: float = Field(
        default=2000,
        gt=0,
        description="An inference running longer than this is a stalled accelerator: the "
        "delegate is re-initialised, else the CPU variant takes over.",
    )
    warmup_runs: int = Field(
        default=2, ge=0, le=100, description="Inferences run on a new model before it serves."
    )


class _Source(_Section):
    fps: float = Field(
        default=15,
        ge=0,
        description="Frames per second. Files and synthetic frames are paced to it (0: as "
        "fast as inference takes them); cameras are asked for it; network streams and "
        "sensors keep their own pace.",
    )
    reconnect_max_s: float = Field(
        default=30, gt=0, description="Longest wait between reconnection attempts."
    )


class CameraSource(_Source):
    type: Literal["camera"] = Field(
        default="camera", description="A V4L2 camera (/dev/videoN) through OpenCV."
    )
    device: str = Field(
        default="/dev/video0", min_length=1, description="V4L2 device path or index (0, 1, …)."
    )
    width: int | None = Field(default=None, gt=0, description="Requested capture width.")
    height: int | None = Field(default=None, gt=0, description="Requested capture height.")


class VideoSource(_Source):
    type: Literal["video"] = Field(default="video", description="A video file through OpenCV.")
    path: FilePath = Field(description="Video file.")
    loop: bool = Field(default=False, description="Start again at the end of the file.")


class _StreamSource(_Source):
    schemes: ClassVar[tuple[str, ...]] = ()
    url: str = Field(description="Stream URL.")
    timeout_s: float = Field(default=10, gt=0, description="Connect and read timeout.")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        return check_url(value, cls.schemes)


class MjpegSource(_StreamSource):
    """An HTTP multipart MJPEG stream."""

    schemes = ("http", "https")
    type: Literal["mjpeg"] = Field(
        default="mjpeg", description="An HTTP multipart MJPEG stream (Basic auth from the URL)."
    )


class RtspSource(_StreamSource):
    """An RTSP stream."""

    schemes = ("rtsp", "rtsps")
    type: Literal["rtsp"] = Field(
        default="rtsp", description="An RTSP stream through OpenCV's FFmpeg."
    )
    transport: Literal["tcp", "udp"] = Field(default="tcp", description="RTP transport.")


class ImagesSource(_Source):
    type: Literal["images"] = Field(
        default="images", description="A folder of still images, read in name order."
    )
    path: FilePath = Field(description="Folder of images (.jpg, .jpeg, .png, .bmp), by name.")
    loop: bool = Field(default=False, description="Start again after the last image.")


class Picamera2Source(_Source):
    type: Literal["picamera2"] = Field(
        default="picamera2", description="The Raspberry Pi camera through picamera2."
    )
    width: int = Field(default=640, gt=0, description="Capture width.")
    height: int = Field(default=480, gt=0, description="Capture height.")


class _SensorSource(_Source):
    window: int = Field(default=32, ge=1, le=1_000_000, description="Samples per inference.")
    hop: int | None = Field(
        default=None, ge=1, description="Samples between windows; default: the window size."
    )
    channels: int = Field(default=1, ge=1, le=4096, description="Values per sample.")
    fps: float = Field(default=0, ge=0, description="Unused for sensors: samples pace them.")


class SerialSource(_SensorSource):
    type: Literal["serial"] = Field(
        default="serial", description="A serial sensor: one sample of numbers per line."
    )
    device: str = Field(default="/dev/ttyUSB0", min_length=1, description="Serial device.")
    baudrate: int = Field(default=115200, gt=0, description="Serial baud rate.")


class UdpSource(_SensorSource):
    type: Literal["udp"] = Field(
        default="udp",
        description='A UDP sensor: JSON numbers, lists or {"values": […]} per datagram.',
    )
    port: int = Field(ge=1, le=65535, description="UDP port receiving JSON-lines datagrams.")
    bind: str = Field(default="0.0.0.0", min_length=1, description="Address to listen on.")


class SyntheticSource(_Source):
    type: Literal["synthetic"] = Field(
        default="synthetic", description="A generated moving test pattern (no hardware)."
    )
    width: int = Field(default=320, gt=0, le=8192, description="Frame width.")
    height: int = Field(default=240, gt=0, le=8192, description="Frame height.")
    frames: int = Field(default=0, ge=0, description="Frames to produce; 0 means endless.")


SourceConfig = Annotated[
    CameraSource
    | VideoSource
    | MjpegSource
    | RtspSource
    | ImagesSource
    | Picamera2Source
    | SerialSource
    | UdpSource
    | SyntheticSource,
    Field(discriminator="type"),
]
SOURCE_TYPES = tuple(
    cls.model_fields["type"].default
    for cls in (
        CameraSource,
        VideoSource,
        MjpegSource,
        RtspSource,
        ImagesSource,
        Picamera2Source,
        SerialSource,
        UdpSource,
        SyntheticSource,
    )
)


class ResultsConfig(_Section):
    publish: Literal["every", "on_change", "interval", "off"] = Field(
        default="on_change", description="When inference results are published."
    )
    min_score: float = Field(default=0.5, ge=0, le=1, description="Lowest score reported.")
    top_k: int = Field(default=5, ge=1, le=1000, description="Most classes or detections kept.")
    interval_s: float = Field(
        default=1, gt=0, description="Seconds between results when publish is interval."
    )
    qos: Literal[0, 1] = Field(
        default=1,
        description="1: results go through the outbox and are never lost; 0: sent only "
        "while connected, not kept.",
    )


class MqttConfig(_Section):
    url: str | None = Field(
        default=None,
        description="mqtt:// or mqtts:// broker URL; absent: telemetry stays in the outbox.",
    )
    ca: FilePath | None = Field(default=None, description="CA certificate of the broker.")
    cert: FilePath | None = Field(default=None, description="Device certificate (mTLS).")
    key: FilePath | None = Field(default=None, description="Device private key (mTLS).")
    topic_prefix: str = Field(
        default="edge", pattern=r"^[^#+/][^#+]*$", description="Topic prefix."
    )
    username: str | None = Field(
        default=None, min_length=1, description="User name, when the broker wants a password."
    )
    password_file: FilePath | None = Field(
        default=None, description="File holding the password (first line)."
    )
    password_credential: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="systemd credential holding the password (LoadCredential= in the unit; "
        "read from $CREDENTIALS_DIRECTORY).",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto tries 5, then 3.1.1."
    )
    keepalive_s: int = Field(default=60, ge=5, le=65535, description="Keep-alive interval.")
    session_expiry_s: int = Field(
        default=86400,
        ge=0,
        description="How long the broker keeps this device's session (subscriptions, "
        "queued commands) while it is offline. MQTT 5 only; 3.1.1 keeps it until cleared.",
    )
    reconnect_max_s: float = Field(
        default=60, gt=0, description="Longest wait between reconnect attempts."
    )
    max_inflight: int = Field(
        default=128, ge=1, le=65535, description="QoS 1 messages sent but not yet acknowledged."
    )
    command_max_bytes: int = Field(
        default=16384, ge=64, description="Largest command payload; larger ones get an error."
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, ("mqtt", "mqtts"))


class TelemetryConfig(_Section):
    interval_s: float = Field(default=10, gt=0, description="Seconds between telemetry.")
    outbox: FilePath = Field(
        default=Path("/var/lib/edge-agent/outbox.sqlite"), description="SQLite outbox file."
    )
    outbox_max_mb: float = Field(default=64, gt=0, description="Outbox size cap, in MB.")


class UpdateConfig(_Section):
    probation_s: float = Field(
        default=120,
        ge=0,
        description="Seconds a new release is watched after activation; 0 turns probation off.",
    )
    probation_max_error_rate: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Share of frames failing during probation that rolls the release back.",
    )
    probation_min_errors: int = Field(
        default=5, ge=1, description="Failed frames needed before the error rate counts."
    )
    crash_loop_restarts: int = Field(
        default=3,
        ge=1,
        description="Agent restarts during probation that roll the release back.",
    )
    validate_timeout_s: float = Field(
        default=120, gt=0, description="Deadline of loading, self-test and budget together."
    )
    activate_timeout_s: float = Field(
        default=30, gt=0, description="Deadline for the pipeline to take the new model."
    )
    budget_runs: int = Field(
        default=50, ge=5, le=100_000, description="Timed inferences for the latency budget."
    )
    poll_jitter: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Each poll waits poll_interval_s times a random 1 +- this, so a fleet "
        "does not poll in step.",
    )
    retry_max_s: float = Field(
        default=300, gt=0, description="Longest wait before retrying a failed download."
    )
    max_clock_skew_s: float = Field(
        default=300,
        gt=0,
        description="A desired state issued further than this ahead of the device's clock is "
        "refused (event desired_invalid), so one future-dated instruction cannot make every "
        "later one look stale. Also the allowance when judging whether a signed index.json "
        "has expired.",
    )
    desired_public_key: FilePath | None = Field(
        default=None,
        description="Ed25519 public key (PEM) of the fleet's deploy key; when set, desired "
        "state that is unsigned, signed by another key or meant for another target is refused.",
    )
    desired_public_keys: list[FilePath] = Field(
        default_factory=list,
        description="More trusted deploy keys (PEM paths), trusted together with "
        "desired_public_key; a key removed here is revoked.",
    )

    @property
    def desired_keys(self) -> list[Path]:
        """desired_public_key and desired_public_keys: every deploy key accepted."""
        return [
            *([self.desired_public_key] if self.desired_public_key else []),
            *self.desired_public_keys,
        ]


# A label of the model (labels.txt) that gets a "detected" binary sensor in Home Assistant:
# plain characters, so it is safe inside the value_template's quotes and as an object id.
HA_LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"


def ha_slug(label: str) -> str:
    """A label as a Home Assistant object id part: lower case, runs of anything but
    letters and digits as one ``_`` (``Traffic light`` -> ``traffic_light``)."""
    out, gap = [], False
    for ch in label.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            gap = False
        elif not gap:
            out.append("_")
            gap = True
    return "".join(out).strip("_")


class HomeAssistantConfig(_Section):
    discovery: bool = Field(
        default=False,
        description="Publish Home Assistant MQTT discovery configs (retained) for this device; "
        "false clears the ones published before.",
    )
    prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$",
        description="Home Assistant's discovery prefix (its MQTT integration's setting).",
    )
    labels: list[Annotated[str, Field(pattern=HA_LABEL_PATTERN)]] = Field(
        default_factory=list,
        max_length=64,
        description="Model labels that each get a binary sensor '<label> detected' (from "
        "results; needs results.publish other than off).",
    )
    off_delay_s: int = Field(
        default=10,
        ge=1,
        le=86400,
        description="Seconds after the last result with a label before its binary sensor "
        "turns off by itself.",
    )

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for label in value:
            slug = ha_slug(label)
            if slug in seen:
                raise ValueError(
                    f"{seen[slug]!r} and {label!r} give the same entity id ({slug}); keep one"
                )
            seen[slug] = label
        return value


SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108, NUL-terminated)


class ControlConfig(_Section):
    socket: Path | None = Field(
        default=None,
        description="Unix socket where the running agent answers local commands (edge-agent "
        "status, models pull/rollback); created 0660. Default: control.sock beside store.dir "
        "(/var/lib/edge-agent/control.sock).",
    )


SNAPSHOT_MAX_KB = 160  # base64 (4/3) of 160 KiB and the reply stay under 256 KiB packets


class PrivacyConfig(_Section):
    snapshots: bool = Field(
        default=False,
        description="Allow the snapshot command: one JPEG of the current frame, sent to "
        "whoever may command this device. Off: the command is refused.",
    )
    snapshot_max_kb: int = Field(
        default=96,
        ge=8,
        le=SNAPSHOT_MAX_KB,
        description="Largest snapshot JPEG, in KiB: lower quality, then a smaller image, "
        "until it fits, else the command is refused. At most 160, so that the reply "
        "(base64) stays within the shipped broker's max_packet_size (256 KiB).",
    )


def _listen(value: str) -> str:
    """``HOST:PORT`` with an IP address (``[::1]:9101`` for IPv6); no name lookup here."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        if ":" in host and not bracketed:  # "::1:9101" could be read two ways
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r} is not HOST:PORT with an IP address; e.g. 127.0.0.1:9101, [::1]:9101"
        ) from None
    if not (sep and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be a number in 1-65535; e.g. 127.0.0.1:9101")
    return value


class MetricsConfig(_Section):
    listen: Annotated[str, AfterValidator(_listen)] | None = Field(
        default=None,
        description="HOST:PORT where Prometheus scrapes /metrics (127.0.0.1:9101; [::1]:9101); "
        "absent: no metrics endpoint. Needs prometheus_client (pip install "
        "'edge-agent[metrics]'). A port in use is logged and retried; inference goes on.",
    )


class Config(_Section):
    device: DeviceConfig = Field(default_factory=DeviceConfig, description="This device.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Model registry.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to follow.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Local model store.")
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Interpreter settings."
    )
    source: SourceConfig = Field(
        default_factory=CameraSource, description="Input stream; its keys depend on source.type."
    )
    results: ResultsConfig = Field(default_factory=ResultsConfig, description="Result publishing.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT broker.")
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig, description="Telemetry and outbox."
    )
    update: UpdateConfig = Field(
        default_factory=UpdateConfig, description="Update gate, probation and polling."
    )
    control: ControlConfig = Field(
        default_factory=ControlConfig, description="Local control socket of the running agent."
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="What the agent may send of what it sees."
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Prometheus endpoint (off by default)."
    )
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant MQTT discovery."
    )

    @property
    def control_socket(self) -> Path:
        """The control socket's path: control.socket, else control.sock beside store.dir.

        The daemon and the CLI both derive it from the same config file.
        """
        return self.control.socket or self.store.dir.parent / "control.sock"

    @model_validator(mode="after")
    def _requirements(self) -> Config:
        if self.registry.url is not None and self.model.name is None:
            raise PydanticCustomError("missing", "model.name is required when registry.url is set")
        mqtt = self.mqtt
        if (mqtt.cert is None) != (mqtt.key is None):
            raise PydanticCustomError("missing", "mqtt.cert and mqtt.key go together")
        if mqtt.url and mqtt.url.startswith("mqtt://") and (mqtt.ca or mqtt.cert):
            raise PydanticCustomError(
                "scheme", "mqtt.ca, mqtt.cert and mqtt.key need an mqtts:// mqtt.url"
            )
        if mqtt.password_file and mqtt.password_credential:
            raise PydanticCustomError(
                "conflict", "set mqtt.password_file or mqtt.password_credential, not both"
            )
        if (mqtt.password_file or mqtt.password_credential) and not mqtt.username:
            raise PydanticCustomError("missing", "a password needs mqtt.username")
        if self.homeassistant.discovery and "." in self.device.id:
            raise PydanticCustomError(
                "ha_topic",
                "homeassistant.discovery: device.id '{id}' has a '.', which Home Assistant "
                "refuses in a discovery topic; give the device an id of letters, digits, _ "
                "and - (the broker's ACL matches topics on the id itself)",
                {"id": self.device.id},
            )
        length = len(os.fsencode(self.control_socket))
        if length > SUN_PATH_MAX:
            where = "" if self.control.socket else " (the default, beside store.dir)"
            raise PydanticCustomError(
                "too_long",
                "control.socket: {path}{where} is {length} bytes, more than a Unix socket "
                "path may have ({limit}); set control.socket to a shorter path",
                {
                    "path": str(self.control_socket),
                    "where": where,
                    "length": length,
                    "limit": SUN_PATH_MAX,
                },
            )
        return self


SECTIONS = tuple(Config.model_fields)


def _dotted(path: tuple[str | int, ...]) -> str:
    """A key path for a message (``device.groups[1]``: list positions as ``[N]``); a key
    with control characters is shown quoted, so a config cannot write line breaks or
    escape sequences to the operator's terminal."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if part.isprintable() else repr(part)
            text += f".{shown}" if text else shown
    return text


@dataclass(frozen=True)
class _Origin:
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
    # Scalars stay strings and pydantic converts them ("300" -> 300, "true" -> True),
    # so "0123" stays a device id; lists and maps are written in YAML flow style.
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
        if section not in SECTIONS or not key:
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


def _describe(
    error: ValidationError, origins: dict[tuple[str, ...], _Origin], file: str
) -> list[str]:
    problems = []
    for item in error.errors():
        path = tuple(item["loc"])
        if len(path) > 1 and path[0] == "source" and path[1] in SOURCE_TYPES:
            path = path[:1] + path[2:]  # pydantic puts the union's tag in the path
        loc = tuple(str(part) for part in path)
        dotted = _dotted(path)
        where = file
        for depth in range(len(loc), 0, -1):  # nearest enclosing key that has a line
            if loc[:depth] in origins:
                where = origins[loc[:depth]].text
                break
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_not_found":
            dotted = f"{dotted}.type"
            message = f"missing; one of {', '.join(SOURCE_TYPES)}"
        elif item["type"] == "union_tag_invalid":
            dotted = f"{dotted}.type"
            ctx = item.get("ctx", {})
            message = f"unknown type {ctx.get('tag')!r}; one of {ctx.get('expected_tags')}"
        problems.append(f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}")
    return problems


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
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, file)) from exc


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
