"""The config's sections on the model's way (device, registry, model, store, runtime,
results, update) and what every section shares: typed, frozen msgspec structs.

Each field is ``Annotated[type, Meta(constraints, description=...)]``: the constraints
are checked by :func:`agent.config.parse_config` (``msgspec.convert``), the description
goes into docs/configuration.md (``agent.configdoc``). Rules a constraint cannot say are
in ``__post_init__`` and raise ``ValueError("<key>: <problem>")``, which the loader turns
into ``<file>:<line>: <section>.<key>: <problem>``. Validation does no I/O.

The sections of the device's links (MQTT, telemetry, Home Assistant, the control
socket, privacy, metrics) are in :mod:`agent.config_links`, the sources in
:mod:`agent.config_sources`, the pipelines and cascades in :mod:`agent.config_pipelines`.
"""

import os
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.names import NAME_PATTERN, check_group_name
from agent.structs import rule_pattern, whole

__all__ = ["whole"]  # re-exported: agent.manifest's patterns

# Model names become URL path segments and store folder names: keep them plain.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


# The rules of the patterns in words, for the error (agent.structs.pattern).
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"
MODEL_NAME_RULE = f"{NAME_RULE}, at most 128 characters"


# Every path in the config; "" (the current folder) and NUL are refused where paths are
# converted (agent.config_validate.decode_hook).
FilePath = Path


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


def field_url(key: str, value: str | None, schemes: tuple[str, ...]) -> None:
    """``check_url`` for the key ``key``: the ValueError names it (see the module doc)."""
    if value is not None:
        try:
            check_url(value, schemes)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None


def _hostname() -> str:
    """The host's name, as ``socket.gethostname()`` gives it (both read uname's node
    name) without importing socket (~2 ms of ``edge-agent status``)."""
    return os.uname().nodename


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config section: unknown keys refused, immutable once validated."""


class DeviceConfig(Section, frozen=True):
    id: Annotated[
        str,
        Meta(
            min_length=1,
            pattern=rule_pattern(NAME_PATTERN.pattern, NAME_RULE),
            description="Device id used in MQTT topics; defaults to the hostname.",
        ),
    ] = msgspec.field(default_factory=_hostname)
    groups: Annotated[
        list[str],
        Meta(
            description="Fleet groups this device is in; names like device ids (letters, "
            "digits, '.', '_', '-')."
        ),
    ] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.id == "groups":  # edge/groups/… is where group desired states live
            raise ValueError("id: 'groups' is reserved for group topics; pick another device id")
        for index, group in enumerate(self.groups):
            problem = check_group_name(group)
            if problem is not None:
                # Without this, the device's subscription to its group's topic is refused
                # (or, with '+' or '#', is a wildcard) and it never connects, silently.
                raise ValueError(f"groups[{index}]: {problem} (it is a topic level)")


class RegistryConfig(Section, frozen=True):
    url: Annotated[
        str | None,
        Meta(
            description="Registry base URL: http(s)://… or file:///path. Required by run and "
            "check-config."
        ),
    ] = None
    public_key: Annotated[
        FilePath | None,
        Meta(
            description="Ed25519 public key (PEM). When set, unsigned or badly signed releases "
            "and index.json are refused."
        ),
    ] = None
    public_keys: Annotated[
        list[FilePath],
        Meta(
            description="More trusted registry keys (PEM paths), trusted together with "
            "public_key: a signature by any of them is accepted. Rotate by listing old and "
            "new, re-signing, then dropping the old one; a key removed here is revoked."
        ),
    ] = msgspec.field(default_factory=list)
    ca: Annotated[
        FilePath | None,
        Meta(description="CA bundle for an https registry with a private CA."),
    ] = None
    poll_interval_s: Annotated[float, Meta(gt=0, description="Seconds between polls.")] = 300
    max_download_mb: Annotated[
        float, Meta(gt=0, description="Largest file a release may list, in MB.")
    ] = 500
    max_manifest_kb: Annotated[
        float, Meta(gt=0, description="Largest manifest.json or index.json accepted, in KB.")
    ] = 1024
    timeout_s: Annotated[
        float, Meta(gt=0, description="Per-read timeout of registry requests.")
    ] = 30
    connect_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="Longest wait for a connection to the registry (at most timeout_s). A "
            "registry that cannot be reached when a fetch begins fails it at once.",
        ),
    ] = 5
    deadline_s: Annotated[
        float,
        Meta(gt=0, description="Overall deadline for fetching one file, retries included."),
    ] = 1800
    retries: Annotated[
        int, Meta(ge=0, description="Retries of a broken transfer (resumed with Range).")
    ] = 5
    retry_backoff_s: Annotated[
        float,
        Meta(
            gt=0,
            description="First retry waits up to this long; doubles per retry, capped at 60 s.",
        ),
    ] = 1.0

    def __post_init__(self) -> None:
        field_url("url", self.url, ("http", "https", "file"))

    @property
    def trusted_keys(self) -> list[Path]:
        """public_key and public_keys: every key whose signature is accepted."""
        return [*([self.public_key] if self.public_key else []), *self.public_keys]


class ModelConfig(Section, frozen=True):
    name: Annotated[
        Annotated[str, Meta(pattern=rule_pattern(MODEL_NAME_PATTERN, MODEL_NAME_RULE))] | None,
        Meta(description="Model name in the registry. Required by run and check-config."),
    ] = None
    channel: Annotated[str, Meta(min_length=1, description="index.json channel to follow.")] = (
        "stable"
    )


class StoreConfig(Section, frozen=True):
    dir: Annotated[FilePath, Meta(description="Where releases are kept.")] = Path(
        "/var/lib/edge-agent/models"
    )
    keep: Annotated[int, Meta(ge=1, description="Releases kept on disk for rollback.")] = 3
    reserve_mb: Annotated[
        float, Meta(ge=0, description="Free space that must remain after a download, in MB.")
    ] = 64


class RuntimeConfig(Section, frozen=True):
    accelerator: Annotated[
        Literal["auto", "edgetpu", "cpu"],
        Meta(description="auto uses the Edge TPU when present, else the CPU variant."),
    ] = "auto"
    edgetpu_device: Annotated[
        str,
        Meta(
            pattern=rule_pattern(r"^(|usb|pci)(:\d+)?$", '"", usb, usb:N or pci:N'),
            description='Edge TPU to use: "", usb, usb:N, pci:N.',
        ),
    ] = ""
    edgetpu_library: Annotated[
        str,
        Meta(
            min_length=1,
            description="The Edge TPU delegate library (a name the loader finds, or a path).",
        ),
    ] = "libedgetpu.so.1"
    threads: Annotated[
        Annotated[int, Meta(ge=1, le=64)] | Literal["auto"],
        Meta(
            description="CPU threads of each interpreter (1..64), or auto: chosen with "
            "runtime.interpreters by a short calibration at model load."
        ),
    ] = 2
    interpreters: Annotated[
        Annotated[int, Meta(ge=1, le=16)] | Literal["auto"],
        Meta(
            description="Interpreters serving frames side by side (1..16), each of one "
            "thread when more than one, results kept in frame order; auto: chosen by a "
            "short calibration at model load. The Edge TPU keeps one."
        ),
    ] = 1
    invoke_timeout_ms: Annotated[
        float,
        Meta(
            gt=0,
            description="An inference running longer than this is a stalled accelerator: the "
            "delegate is re-initialised, else the CPU variant takes over.",
        ),
    ] = 2000
    warmup_runs: Annotated[
        int,
        Meta(ge=0, le=100, description="Inferences run on a new model before it serves."),
    ] = 2


class ResultsConfig(Section, frozen=True):
    publish: Annotated[
        Literal["every", "on_change", "interval", "off"],
        Meta(description="When inference results are published."),
    ] = "on_change"
    min_score: Annotated[float, Meta(ge=0, le=1, description="Lowest score reported.")] = 0.5
    top_k: Annotated[int, Meta(ge=1, le=1000, description="Most classes or detections kept.")] = 5
    iou_threshold: Annotated[
        float,
        Meta(
            gt=0,
            le=1,
            description="YOLO detection: a box overlapping a better one of the same class by "
            "more than this (intersection over union) is dropped (NMS).",
        ),
    ] = 0.45
    interval_s: Annotated[
        float, Meta(gt=0, description="Seconds between results when publish is interval.")
    ] = 1
    qos: Annotated[
        Literal[0, 1],
        Meta(
            description="1: results go through the outbox and are never lost; 0: sent only "
            "while connected, not kept."
        ),
    ] = 1


class UpdateConfig(Section, frozen=True):
    probation_s: Annotated[
        float,
        Meta(
            ge=0,
            description="Seconds a new release is watched after activation; 0 turns probation off.",
        ),
    ] = 120
    probation_max_error_rate: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description="Share of frames failing during probation that rolls the release back.",
        ),
    ] = 0.2
    probation_min_errors: Annotated[
        int, Meta(ge=1, description="Failed frames needed before the error rate counts.")
    ] = 5
    crash_loop_restarts: Annotated[
        int,
        Meta(ge=1, description="Agent restarts during probation that roll the release back."),
    ] = 3
    validate_timeout_s: Annotated[
        float, Meta(gt=0, description="Deadline of loading, self-test and budget together.")
    ] = 120
    activate_timeout_s: Annotated[
        float, Meta(gt=0, description="Deadline for the pipeline to take the new model.")
    ] = 30
    budget_runs: Annotated[
        int, Meta(ge=5, le=100_000, description="Timed inferences for the latency budget.")
    ] = 50
    poll_jitter: Annotated[
        float,
        Meta(
            ge=0,
            lt=1,
            description="Each poll waits poll_interval_s times a random 1 +- this, so a fleet "
            "does not poll in step.",
        ),
    ] = 0.2
    retry_max_s: Annotated[
        float, Meta(gt=0, description="Longest wait before retrying a failed download.")
    ] = 300
    max_clock_skew_s: Annotated[
        float,
        Meta(
            gt=0,
            description="A desired state issued further than this ahead of the device's clock "
            "is refused (event desired_invalid), so one future-dated instruction cannot make "
            "every later one look stale. Also the allowance when judging whether a signed "
            "index.json has expired.",
        ),
    ] = 300
    desired_public_key: Annotated[
        FilePath | None,
        Meta(
            description="Ed25519 public key (PEM) of the fleet's deploy key; when set, desired "
            "state that is unsigned, signed by another key or meant for another target is "
            "refused."
        ),
    ] = None
    desired_public_keys: Annotated[
        list[FilePath],
        Meta(
            description="More trusted deploy keys (PEM paths), trusted together with "
            "desired_public_key; a key removed here is revoked."
        ),
    ] = msgspec.field(default_factory=list)

    @property
    def desired_keys(self) -> list[Path]:
        """desired_public_key and desired_public_keys: every deploy key accepted."""
        return [
            *([self.desired_public_key] if self.desired_public_key else []),
            *self.desired_public_keys,
        ]
