"""The device command line: status, models list/pull/rollback, exit codes, progress."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

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
        assert "store.keep: 'many' is not a whole number" in result.stderr


def test_bad_usage_exits_2(device: Device) -> None:
    assert device.cli("models", "pull", "--version", "two").returncode == 2


def test_registry_that_is_down_is_reported_at_once_with_the_retry_plan(
    fleet: Fleet, device: Device
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        device.set("registry", url=url, retries=5, retry_backoff_s=2)
        started = time.monotonic()
        result = device.cli("models", "pull")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 5  # not after five retries with backoff
    assert result.stderr == (
        f"edge-agent: transport: {url}{MODEL}/index.json: cannot connect: connection refused "
        "(is the registry running?); nothing was changed; a running agent tries again every "
        "300 s (registry.poll_interval_s)\n"
    )


def test_stalled_registry_is_reported_within_the_read_timeout(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1)
    server.fault(f"{MODEL}/index.json", "stall", times=-1, max_seconds=20)
    device.set("registry", timeout_s=1, retries=1, retry_backoff_s=0.1)
    started = time.monotonic()
    result = device.cli("models", "pull")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert 2 <= elapsed < 5  # two tries of 1 s each, then said
    assert "no data within the read timeout (registry.timeout_s)" in result.stderr
    assert "gave up on person-detector/index.json after 2 attempts" in result.stderr
    assert "nothing was changed" in result.stderr and len(result.stderr.splitlines()) == 1


def _pull_on_a_terminal(device: Device, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``models pull ARGS`` with stderr on a pseudo-terminal; returns what it showed there."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", "pull", *args],
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
        timeout=60,
        env={**env, "EDGE_AGENT_CONFIG": str(device.config_path)},
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
    return proc, shown.decode()


def test_long_download_shows_progress_on_a_terminal(fleet: Fleet, device: Device) -> None:
    fleet.release(1, size=3_000_000)
    proc, shown = _pull_on_a_terminal(device)
    assert proc.returncode == 0
    # bytes done / total, a rate, an ETA; the last frame ends the line
    frames = re.findall(r"model\.tflite  [^\r]*", shown)
    assert frames[0].startswith("model.tflite  0.0 / 3.0 MB  -- B/s  ETA --")
    assert re.match(r"model\.tflite  3\.0 / 3\.0 MB  [\d.]+ [kMG]?B/s  ETA 0 s", frames[-1])
    assert shown.endswith("\n")
    assert f"activated {MODEL} v1 (3.0 MB fetched" in proc.stdout


def test_json_mode_shows_no_progress_even_on_a_terminal(fleet: Fleet, device: Device) -> None:
    fleet.release(1, size=3_000_000)
    proc, shown = _pull_on_a_terminal(device, "--json")
    assert proc.returncode == 0 and shown == ""
    assert json.loads(proc.stdout)["active"]["version"] == 1


def test_ctrl_c_keeps_the_partial_download_and_the_next_pull_resumes_it(
    fleet: Fleet, device: Device, server: RegistryServer
) -> None:
    fleet.release(1, size=3_000_000)
    server.fault(f"{MODEL}/1/model.tflite", "stall", at=1_200_000, max_seconds=20)
    device.set("registry", timeout_s=15, deadline_s=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "models", "pull", "--config", str(device.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        parts = device.root / "store" / "tmp"
        deadline = time.monotonic() + 10
        # The part file is written through a buffer: its last few KiB before the stall
        # reach the disk only when the file is closed (here: on Ctrl-C). Waiting for all
        # 1.2 MB on disk waited for the 15 s read timeout, and the retry then finished
        # the download before the SIGINT came (a flaky exit 0).
        while sum(p.stat().st_size for p in parts.glob("*.part")) < 1_200_000 - 65_536:
            assert time.monotonic() < deadline and proc.poll() is None, "no bytes arrived"
            time.sleep(0.02)
        time.sleep(0.5)  # the rest of the bytes before the stall: on loopback, at once
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err == (
        "edge-agent: interrupted: partial download of model.tflite kept for resume "
        "(1.2 of 3.0 MB)\n"
    )
    device.assert_serving(None)
    server.clear_log()
    again = device.cli("models", "pull", "--json")
    assert again.returncode == 0, again.stderr
    (resumed,) = server.requests_for(f"{MODEL}/1/model.tflite")
    assert (resumed.range_start, resumed.sent) == (1_200_000, 1_800_000)
    labels = sum(r.sent for r in server.requests_for(f"{MODEL}/1/labels.txt"))
    # The summary counts the bytes of this run only: the rest of the model, the labels.
    assert json.loads(again.stdout)["fetched_bytes"] == 1_800_000 + labels
    device.assert_serving(1)


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


# Ctrl-C while the command line is still loading its modules (seconds on a Raspberry Pi):
# the interrupt is raised from inside the import, as a real SIGINT at that moment would.
# Both moments: while the options' module loads (before any parsing), and while the
# command's own modules load (after the options were parsed, agent.cli_parser being light).
INTERRUPTED_WHILE_LOADING = """
import os, signal, sys
from agent import entry

tool, module = sys.argv.pop(1), sys.argv.pop(1)

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.exit(getattr(entry, tool)())
"""


@pytest.mark.parametrize(
    ("script", "name", "module", "args"),
    [
        ("edge_agent", "edge-agent", "agent.cli_parser", ["--version"]),
        ("edge_agent", "edge-agent", "agent.config", ["status", "--config", "/nonexistent"]),
        ("edge_fleet", "edge-fleet", "agent.fleet.cli_parser", ["--version"]),
        ("edge_fleet", "edge-fleet", "agent.config", ["acl", "--device", "d1"]),
    ],
)
def test_ctrl_c_while_the_commands_load_ends_quietly(
    script: str, name: str, module: str, args: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_WHILE_LOADING, script, module, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (130, f"{name}: interrupted\n")
