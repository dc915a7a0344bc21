"""The config's sections of the device's links: MQTT, telemetry, Home Assistant, the
control socket, privacy and the metrics endpoint. Typed, frozen msgspec structs;
conventions as in :mod:`agent.config_sections`.
"""

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.config_sections import NAME_RULE, FilePath, Section, field_url
from agent.structs import rule_pattern

# A label of the model (labels.txt) that gets a "detected" binary sensor in Home Assistant:
# plain characters, so it is safe inside the value_template's quotes and as an object id.
HA_LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"
SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108, NUL-terminated)
SNAPSHOT_MAX_KB = 160  # base64 (4/3) of 160 KiB and the reply stay under 256 KiB packets

HA_LABEL_RULE = (
    "letters, digits, spaces, '.', '_' and '-', starting with a letter or digit, at most 64 "
    "characters"
)


_CREDENTIAL = rule_pattern(r"^[A-Za-z0-9._-]+$", "letters, digits, '.', '_' and '-'")


class MqttConfig(Section, frozen=True):
    url: Annotated[
        str | None,
        Meta(description="mqtt:// or mqtts:// broker URL; absent: telemetry stays in the outbox."),
    ] = None
    ca: Annotated[FilePath | None, Meta(description="CA certificate of the broker.")] = None
    cert: Annotated[FilePath | None, Meta(description="Device certificate (mTLS).")] = None
    key: Annotated[FilePath | None, Meta(description="Device private key (mTLS).")] = None
    topic_prefix: Annotated[
        str,
        Meta(
            pattern=rule_pattern(r"^[^#+/][^#+]*$", "text without '#' or '+', not first '/'"),
            description="Topic prefix.",
        ),
    ] = "edge"
    username: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(description="User name, when the broker wants a password."),
    ] = None
    password_file: Annotated[
        FilePath | None, Meta(description="File holding the password (first line).")
    ] = None
    password_credential: Annotated[
        Annotated[str, Meta(pattern=_CREDENTIAL)] | None,
        Meta(
            description="systemd credential holding the password (LoadCredential= in the "
            "unit; read from $CREDENTIALS_DIRECTORY)."
        ),
    ] = None
    protocol: Annotated[
        Literal["auto", "5", "3.1.1"],
        Meta(description="MQTT version; auto tries 5, then 3.1.1."),
    ] = "auto"
    keepalive_s: Annotated[int, Meta(ge=5, le=65535, description="Keep-alive interval.")] = 60
    session_expiry_s: Annotated[
        int,
        Meta(
            ge=0,
            description="How long the broker keeps this device's session (subscriptions, "
            "queued commands) while it is offline. MQTT 5 only; 3.1.1 keeps it until cleared.",
        ),
    ] = 86400
    reconnect_max_s: Annotated[
        float, Meta(gt=0, description="Longest wait between reconnect attempts.")
    ] = 60
    max_inflight: Annotated[
        int,
        Meta(ge=1, le=65535, description="QoS 1 messages sent but not yet acknowledged."),
    ] = 128
    command_max_bytes: Annotated[
        int, Meta(ge=64, description="Largest command payload; larger ones get an error.")
    ] = 16384

    def __post_init__(self) -> None:
        field_url("url", self.url, ("mqtt", "mqtts"))


class TelemetryConfig(Section, frozen=True):
    interval_s: Annotated[float, Meta(gt=0, description="Seconds between telemetry.")] = 10
    outbox: Annotated[FilePath, Meta(description="SQLite outbox file.")] = Path(
        "/var/lib/edge-agent/outbox.sqlite"
    )
    outbox_max_mb: Annotated[float, Meta(gt=0, description="Outbox size cap, in MB.")] = 64


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


class HomeAssistantConfig(Section, frozen=True):
    discovery: Annotated[
        bool,
        Meta(
            description="Publish Home Assistant MQTT discovery configs (retained) for this "
            "device; false clears the ones published before."
        ),
    ] = False
    prefix: Annotated[
        str,
        Meta(
            pattern=rule_pattern(
                r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$",
                f"topic levels joined by '/', each of {NAME_RULE}",
            ),
            description="Home Assistant's discovery prefix (its MQTT integration's setting).",
        ),
    ] = "homeassistant"
    labels: Annotated[
        list[Annotated[str, Meta(pattern=rule_pattern(HA_LABEL_PATTERN, HA_LABEL_RULE))]],
        Meta(
            max_length=64,
            description="Model labels that each get a binary sensor '<label> detected' (from "
            "results; needs results.publish other than off).",
        ),
    ] = msgspec.field(default_factory=list)
    off_delay_s: Annotated[
        int,
        Meta(
            ge=1,
            le=86400,
            description="Seconds after the last result with a label before its binary sensor "
            "turns off by itself.",
        ),
    ] = 10

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for label in self.labels:
            slug = ha_slug(label)
            if slug in seen:
                raise ValueError(
                    f"labels: {seen[slug]!r} and {label!r} give the same entity id ({slug}); "
                    "keep one"
                )
            seen[slug] = label


class ControlConfig(Section, frozen=True):
    socket: Annotated[
        Path | None,
        Meta(
            description="Unix socket where the running agent answers local commands "
            "(edge-agent status, models pull/rollback); created 0660. Default: control.sock "
            "beside store.dir (/var/lib/edge-agent/control.sock)."
        ),
    ] = None


class PrivacyConfig(Section, frozen=True):
    snapshots: Annotated[
        bool,
        Meta(
            description="Allow the snapshot command: one JPEG of the current frame, sent to "
            "whoever may command this device. Off: the command is refused."
        ),
    ] = False
    snapshot_max_kb: Annotated[
        int,
        Meta(
            ge=8,
            le=SNAPSHOT_MAX_KB,
            description="Largest snapshot JPEG, in KiB: lower quality, then a smaller image, "
            "until it fits, else the command is refused. At most 160, so that the reply "
            "(base64) stays within the shipped broker's max_packet_size (256 KiB).",
        ),
    ] = 96


def check_listen(value: str) -> str:
    """``HOST:PORT`` with an IP address (``[::1]:9101`` for IPv6); no name lookup here.
    Raises ValueError naming the problem and an example."""
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


class MetricsConfig(Section, frozen=True):
    listen: Annotated[
        str | None,
        Meta(
            description="HOST:PORT where Prometheus scrapes /metrics (127.0.0.1:9101; "
            "[::1]:9101); absent: no metrics endpoint. Needs prometheus_client (pip install "
            "'edge-agent[metrics]'). A port in use is logged and retried; inference goes on."
        ),
    ] = None

    def __post_init__(self) -> None:
        if self.listen is not None:
            try:
                check_listen(self.listen)
            except ValueError as exc:
                raise ValueError(f"listen: {exc}") from None
