"""What ``check-config`` and ``run`` check beyond the schema: files, folders, libraries.

``check`` sorts what it finds in two: **errors**, a config that cannot work on this
machine (no registry or model, an unwritable store, a ``file://`` registry that is not
there, a key that cannot be read, a source or runtime whose library is not installed),
and **warnings**, what may still come right by itself (a camera not plugged in yet, a
video file or device node not there yet, a broker or registry that does not answer
now). Errors exit 78; warnings are printed and logged, and the agent starts.

Nothing here imports a heavy library: installed modules are found with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

from agent.config import Config, SourceConfig
from agent.config_pipelines import served_models
from agent.errors import EdgeAgentError

# A module the agent imports only when a part needs it -> what to install for it.
INSTALL = {
    "cv2": "OpenCV: pip install 'edge-agent[video]'",
    "serial": "pyserial: pip install 'edge-agent[serial]'",
    "picamera2": "picamera2: apt install python3-picamera2, in a venv made with "
    "--system-site-packages",
}
RUNTIME_INSTALL = (
    "no TFLite runtime is installed: pip install 'edge-agent[litert]' "
    "(32-bit ARM: pip install tflite-runtime 'numpy<2')"
)
# source.type -> the module it cannot work without.
SOURCE_NEEDS = {
    "camera": "cv2",
    "video": "cv2",
    "rtsp": "cv2",
    "mjpeg": "cv2",  # JPEG decoding
    "images": "cv2",  # image decoding
    "picamera2": "picamera2",
    "serial": "serial",
}
PROBE_TIMEOUT_S = 2.0


class Findings:
    """What a check found: errors (cannot work) and warnings (may come right)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_installed() -> bool:
    return installed("ai_edge_litert") or installed("tflite_runtime")


def missing_library(source_type: str) -> str | None:
    """What to install when ``source_type``'s library is missing (``OpenCV: pip install
    'edge-agent[video]'``), else None.

    ``source_type`` is a ``source.type`` (``video`` also stands for reading video files,
    ``images`` for reading image files)."""
    module = SOURCE_NEEDS.get(source_type)
    if module is None or installed(module):
        return None
    return INSTALL[module]


def check(config: Config, *, probe_network: bool = False) -> Findings:
    """Check ``config`` against this machine; ``probe_network`` also tries the broker
    and an http(s) registry (one TCP connect each, bounded), for ``check-config``."""
    found = Findings()
    _requirements(config, found)
    _files(config, found)
    _folders(config, found)
    _libraries(config, found)
    _source_nodes(config, found)
    _shared_sources(config, found)
    if probe_network:
        _network(config, found)
    return found


def _requirements(config: Config, found: Findings) -> None:
    if config.registry.url is None:
        found.errors.append(
            "registry.url: not set; name the registry to pull models from (https://… or file:///…)"
        )
    if config.model.name is None and not config.pipelines:
        found.errors.append("model.name: not set; name the model to follow in the registry")


def _files(config: Config, found: Findings) -> None:
    files: dict[str, Path | None] = {
        "registry.public_key": config.registry.public_key,
        "registry.ca": config.registry.ca,
        "mqtt.ca": config.mqtt.ca,
        "mqtt.cert": config.mqtt.cert,
        "mqtt.key": config.mqtt.key,
        "mqtt.password_file": config.mqtt.password_file,
        "update.desired_public_key": config.update.desired_public_key,
    }
    public_keys = ["registry.public_key", "update.desired_public_key"]
    for section, more in (
        ("registry.public_keys", config.registry.public_keys),
        ("update.desired_public_keys", config.update.desired_public_keys),
    ):
        for i, listed in enumerate(more):
            files[f"{section}[{i}]"] = listed
            public_keys.append(f"{section}[{i}]")
    unreadable = set()
    for key, path in files.items():
        if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
            unreadable.add(key)
            found.errors.append(f"{key}: cannot read {path}")
    for key in public_keys:
        path = files[key]
        if path is not None and key not in unreadable:
            from agent.verify import load_public_key  # hashlib, json: only with a key

            try:
                load_public_key(path, key)
            except EdgeAgentError as exc:
                found.errors.append(str(exc))


def _writable_folder(key: str, folder: Path, target: Path | None = None) -> str | None:
    """Why ``folder`` (to hold ``target``, when given) cannot be created or written."""
    wanted = target or folder
    if folder.exists() and not folder.is_dir():
        return f"{key}: cannot create {wanted}: {folder} is not a folder"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}: cannot create {wanted}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}: cannot create {wanted}: {existing} is not writable (permission denied)"
    return None


def _folders(config: Config, found: Findings) -> None:
    problems = [
        _writable_folder("store.dir", config.store.dir),
        _writable_folder(
            "telemetry.outbox", config.telemetry.outbox.parent, config.telemetry.outbox
        ),
    ]
    found.errors += [p for p in problems if p]
    url = config.registry.url
    if url is not None and url.startswith("file:"):
        root = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if not root.is_dir():
            found.errors.append(f"registry.url: {url}: no such folder")
        else:
            for name in served_models(config.pipeline_list()):
                if not (root / name / "index.json").is_file():
                    found.warnings.append(
                        f"registry.url: {url} has no {name}/index.json yet; "
                        "publish a release with edge-fleet publish"
                    )


def _libraries(config: Config, found: Findings) -> None:
    if not runtime_installed():
        found.errors.append(f"runtime: {RUNTIME_INSTALL}")
    for key, source in _sources(config):
        missing = missing_library(source.type)
        if missing:
            found.errors.append(f"{key}.type {source.type} needs {missing}")
    if config.metrics.listen is not None and not installed("prometheus_client"):
        found.warnings.append(  # metrics are not worth refusing to serve for
            "metrics.listen: prometheus_client is not installed: pip install "
            "'edge-agent[metrics]'; the agent serves without metrics"
        )


def _sources(config: Config) -> list[tuple[str, SourceConfig]]:
    """Each pipeline's source by its key path (``source``, ``pipelines[1].source``)."""
    if not config.pipelines:
        return [("source", config.source)]
    return [(f"pipelines[{i}].source", p.source) for i, p in enumerate(config.pipelines)]


def _source_nodes(config: Config, found: Findings) -> None:
    for key, source in _sources(config):
        if source.type in ("camera", "serial") and source.device.startswith("/"):
            if not Path(source.device).exists():
                found.warnings.append(
                    f"{key}.device: {source.device} does not exist (yet); the agent waits for it"
                )
        elif source.type == "video" and not source.path.is_file():
            found.warnings.append(f"{key}.path: no video file at {source.path} (yet)")
        elif source.type == "images" and not source.path.is_dir():
            found.warnings.append(f"{key}.path: no folder at {source.path} (yet)")


def exclusive(source: SourceConfig) -> str | None:
    """What only one pipeline can open (a camera, a serial device, a UDP port), as a
    phrase naming it; None for what several can read (files, streams, synthetic)."""
    if source.type == "camera":
        device = source.device
        return f"camera /dev/video{device}" if device.isdigit() else f"camera {device}"
    if source.type == "serial":
        return f"serial device {source.device}"
    if source.type == "udp":
        return f"UDP port {source.port}"
    if source.type == "picamera2":
        return "Pi camera"
    return None


def _shared_sources(config: Config, found: Findings) -> None:
    """Two pipelines on one camera, serial device or UDP port: the second could never
    open it and would reconnect for ever."""
    first: dict[str, str] = {}
    for key, source in _sources(config):
        what = exclusive(source)
        if what is None:
            continue
        if what in first:
            found.errors.append(
                f"{key}: the {what} is already {first[what]}'s; one pipeline per device "
                "(give each pipeline its own source)"
            )
        else:
            first[what] = key


def _network(config: Config, found: Findings) -> None:
    targets = []
    if config.mqtt.url:
        parts = urllib.parse.urlsplit(config.mqtt.url)
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        targets.append(("mqtt.url", parts.hostname or "", port, "telemetry waits in the outbox"))
    url = config.registry.url
    if url is not None and url.startswith(("http:", "https:")):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        targets.append(("registry.url", parts.hostname or "", port, "updates are retried"))
    for key, host, port, meanwhile in targets:
        why = _unreachable(host, port)
        if why:
            found.warnings.append(f"{key}: {host}:{port} {why} now; {meanwhile}")


def _unreachable(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except socket.gaierror:
        return "is not a known host name"
    except ConnectionRefusedError:
        return "refuses connections (nothing listening)"
    except TimeoutError:
        return f"does not answer within {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"
