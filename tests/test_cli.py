"""The device command line: status, models list/pull/rollback, exit codes, progress."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from tests.conftest import MODEL, Device, Fleet
from tests.registry_server import RegistryServer


def test_status_before_any_pull(device: Device) -> None:
    assert device.status()["active"] is None
    result = device.cli("status")
    assert "active:   none" in result.stdout


def test_pull_status_and_list(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    fleet.release(2)
    pulled = device.cli("models", "pull", "--version", "1", "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["active"]["version"] == 1
    assert device.cli("models", "pull").returncode == 0  # the channel: stable -> v2
    status = device.status()
    assert status["active"]["version"] == 2 and status["previous_version"] == 1
    model = next(f for f in status["active"]["files"] if f["role"] == "model")
    assert model["path"].endswith(model["sha256"])
    listing = json.loads(device.cli("models", "list", "--remote", "--json").stdout)
    assert [(r["version"], r["active"]) for r in listing["stored"]] == [(1, False), (2, True)]
    assert listing["registry"] == {"versions": [1, 2], "channels": {"stable": 2}}


def test_refused_update_says_what_was_wrong_in_one_line_and_exits_1(
    fleet: Fleet, device: Device
) -> None:
    fleet.release(1)
    fleet.release(2)
    assert device.cli("models", "pull").returncode == 0
    result = device.cli("models", "pull", "--version", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "edge-agent: refused: person-detector v1: lower than the active v2; refusing a "
        "downgrade (roll back explicitly with `edge-agent models rollback --to 1`)"
    )
    device.assert_serving(2)


def test_rollback_switches_back_at_once_without_download(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1)
    fleet.release(2)
    assert device.cli("models", "pull", "--version", "1").returncode == 0
    assert device.cli("models", "pull", "--version", "2").returncode == 0
    server.clear_log()
    result = device.cli("models", "rollback")
    assert result.returncode == 0, result.stderr
    assert "rolled back person-detector to v1 (was v2)" in result.stdout
    assert server.log == []  # no request at all
    device.assert_serving(1)
    # Forward again to v2, also from the store.
    assert device.cli("models", "rollback", "--to", "2").returncode == 0
    device.assert_serving(2)
    assert server.log == []


def test_rollback_to_a_version_not_in_the_store_is_refused(fleet: Fleet, device: Device) -> None:
    fleet.release(1)
    assert device.cli("models", "pull").returncode == 0
    result = device.cli("models", "rollback", "--to", "7")
    assert result.returncode == 1
    assert "v7 is not in the store (stored: v1)" in result.stderr
    none = device.cli("models", "rollback")
    assert none.returncode == 1 and "no earlier release" in none.stderr
    device.assert_serving(1)


def test_invalid_config_exits_78_for_every_command(device: Device) -> None:
    device.set("store", keep="many")
    for args in (("status",), ("models", "pull"), ("models", "list")):
        result = device.cli(*args)
        assert result.returncode == 78
        assert "store.keep: Input should be a valid integer" in result.stderr


def test_bad_usage_exits_2(device: Device) -> None:
    assert device.cli("models", "pull", "--version", "two").returncode == 2


def test_unreachable_registry_fails_with_exit_1(fleet: Fleet, device: Device) -> None:
    device.set("registry", url="http://127.0.0.1:9/", retries=0)
    result = device.cli("models", "pull")
    assert result.returncode == 1
    assert "edge-agent: transport:" in result.stderr and "cannot connect" in result.stderr


def test_long_download_shows_progress_on_a_terminal(fleet: Fleet, device: Device) -> None:
    fleet.release(1, size=3_000_000)
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", "pull", "--config", str(device.config_path)],
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
        timeout=60,
        env=env,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.returncode == 0
    assert b"model.tflite:" in shown and b"3.0 / 3.0 MB" in shown and b"MB/s" in shown
    assert f"activated {MODEL} v1" in proc.stdout


def test_a_rolled_back_version_is_not_brought_back_by_its_channel(
    fleet: Fleet, device: Device
) -> None:
    fleet.release(1)
    fleet.release(2)  # stable -> v2
    assert device.cli("models", "pull", "--version", "1").returncode == 0
    assert device.cli("models", "pull").returncode == 0
    assert device.cli("models", "rollback").returncode == 0
    again = device.cli("models", "pull")  # the channel still names v2
    assert again.returncode == 0
    assert "v2, which was rolled back on this device" in again.stdout
    device.assert_serving(1)
    # A newer release on the channel is taken as usual; an explicit pull clears the mark.
    assert device.cli("models", "pull", "--version", "2").returncode == 0
    device.assert_serving(2)
