"""check-config and run: a config that cannot work is an error, what may come right
by itself is a warning; missing libraries are named with what to install."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import Config, config_from_dict
from agent.preflight import check
from tests.broker import Mosquitto


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    registry = tmp_path / "registry"
    (registry / "m").mkdir(parents=True, exist_ok=True)
    (registry / "m" / "index.json").write_text('{"schema": 1, "model": "m", "versions": []}')
    data: dict[str, Any] = {
        "registry": {"url": registry.as_uri()},
        "model": {"name": "m"},
        "store": {"dir": str(tmp_path / "store")},
        "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
        "source": {"type": "synthetic"},
    }
    data.update(sections)
    return config_from_dict(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_workable_config_has_no_findings(tmp_path: Path) -> None:
    found = check(_config(tmp_path))
    assert (found.errors, found.warnings) == ([], [])


def test_an_empty_config_is_not_valid() -> None:
    errors = check(config_from_dict({})).errors
    assert any(e.startswith("registry.url: not set") for e in errors)
    assert any(e.startswith("model.name: not set") for e in errors)


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        ({"registry": {"url": "file:///nonexistent/registry"}}, "no such folder"),
        ({"store": {"dir": "/etc/hostname/models"}}, "store.dir: cannot create"),
        ({"store": {"dir": "/etc/hostname"}}, "store.dir: cannot create /etc/hostname: /etc/"),
        ({"telemetry": {"outbox": "/etc/hostname/o.db"}}, "telemetry.outbox: cannot create"),
        ({"source": {"type": "picamera2"}}, "apt install python3-picamera2"),
        ({"registry": {"url": "file:///tmp", "public_key": "/nonexistent.pub"}}, "cannot read"),
    ],
)
def test_what_cannot_work_is_an_error(tmp_path: Path, sections: dict[str, Any], error: str) -> None:
    errors = check(_config(tmp_path, **sections)).errors
    assert any(error in e for e in errors), errors


def test_no_tflite_runtime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("ai_edge_litert", "tflite_runtime"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    errors = check(_config(tmp_path)).errors
    assert errors == [
        "runtime: no TFLite runtime is installed: pip install 'edge-agent[litert]' "
        "(32-bit ARM: pip install tflite-runtime 'numpy<2')"
    ]


def test_opencv_sources_without_opencv_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    for source in ({"type": "video", "path": "/x.mp4"}, {"type": "camera"}):
        errors = check(_config(tmp_path, source=source)).errors
        assert errors == [
            f"source.type {source['type']} needs OpenCV: pip install 'edge-agent[video]'"
        ]


@pytest.mark.parametrize(
    ("source", "warning"),
    [
        ({"type": "camera", "device": "/dev/video97"}, "/dev/video97 does not exist (yet)"),
        ({"type": "video", "path": "/nonexistent.mp4"}, "no video file at /nonexistent.mp4"),
        ({"type": "images", "path": "/nonexistent"}, "no folder at /nonexistent"),
    ],
)
def test_what_may_appear_later_is_a_warning(
    tmp_path: Path, source: dict[str, Any], warning: str
) -> None:
    found = check(_config(tmp_path, source=source))
    assert found.errors == [] and any(warning in w for w in found.warnings), found.warnings


def test_a_registry_folder_without_the_model_yet_is_a_warning(tmp_path: Path) -> None:
    found = check(_config(tmp_path, model={"name": "other"}))
    assert found.errors == []
    assert found.warnings == [
        f"registry.url: {(tmp_path / 'registry').as_uri()} has no other/index.json yet; "
        "publish a release with edge-fleet publish"
    ]


def test_a_broker_that_is_down_is_a_warning_and_one_that_answers_is_not(
    tmp_path: Path, broker: Mosquitto
) -> None:
    port = _free_port()
    down = check(_config(tmp_path, mqtt={"url": f"mqtt://127.0.0.1:{port}"}), probe_network=True)
    assert down.errors == []
    assert down.warnings == [
        f"mqtt.url: 127.0.0.1:{port} refuses connections (nothing listening) now; "
        "telemetry waits in the outbox"
    ]
    up = check(_config(tmp_path, mqtt={"url": broker.url}), probe_network=True)
    assert (up.errors, up.warnings) == ([], [])


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_on_an_empty_file_exits_78_naming_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    result = _cli("check-config", config=path)
    assert result.returncode == 78
    assert f"edge-agent: invalid configuration: {path}: registry.url: not set" in result.stderr
    assert f"edge-agent: invalid configuration: {path}: model.name: not set" in result.stderr
    assert "Traceback" not in result.stderr and "configuration is valid" not in result.stdout


def test_check_config_prints_warnings_and_exits_0(tmp_path: Path) -> None:
    _config(tmp_path)  # the registry folder
    path = tmp_path / "config.yaml"
    settings = {
        "registry": {"url": (tmp_path / "registry").as_uri()},
        "model": {"name": "m"},
        "store": {"dir": str(tmp_path / "store")},
        "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
        "source": {"type": "camera", "device": "/dev/video97"},
    }
    path.write_text(yaml.safe_dump(settings))
    result = _cli("check-config", config=path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: configuration is valid (with warnings)"
    assert f"edge-agent: warning: {path}: source.device: /dev/video97" in result.stderr
    as_json = json.loads(_cli("check-config", "--json", config=path).stdout)
    assert as_json["ok"] is True and len(as_json["warnings"]) == 1


def test_run_refuses_a_config_that_cannot_work_with_78(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"store: {{dir: {tmp_path}/store}}\n")
    result = _cli("run", config=path)
    assert result.returncode == 78
    assert "registry.url: not set" in result.stderr and "Traceback" not in result.stderr
