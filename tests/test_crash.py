"""Crash safety: the agent and publish run as real subprocesses and are killed mid-way.

``EDGE_AGENT_CRASH_AT=<point>`` makes the process SIGKILL itself at that step (see
agent/faults.py). After the crash a fresh process must find exactly the old or the
new release active, with files matching their hashes, and must finish the update.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys

import pytest

from agent.faults import CRASH_ENV, CRASH_POINTS, PUBLISH_CRASH_POINTS
from tests.conftest import MODEL, Device, Fleet, serving_v1_with_v2_published, tflite_bytes
from tests.registry_server import RegistryServer

MODEL_FILE = f"{MODEL}/2/model.tflite"


@pytest.fixture
def on_v1(fleet: Fleet, device: Device, server: RegistryServer) -> Device:
    """A device serving v1, with v2 (3_000_000 bytes) published and not yet pulled."""
    return serving_v1_with_v2_published(fleet, device, server, v2_size=3_000_000)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_install_step_leaves_old_or_new_release(
    on_v1: Device, server: RegistryServer, point: str
) -> None:
    crashed = on_v1.cli("models", "pull", "--version", "2", env={CRASH_ENV: point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # Restart: whichever release is active is whole. Only the pointer switch moves it.
    expected = 2 if point == "pointer_replaced" else 1
    assert on_v1.status()["active"]["version"] == expected
    on_v1.assert_serving(expected)

    part_sizes = [p.stat().st_size for p in on_v1.leftovers() if p.suffix == ".part"]
    server.clear_log()
    finished = on_v1.cli("models", "pull", "--version", "2")
    assert finished.returncode == 0, finished.stderr
    on_v1.assert_serving(2)
    assert on_v1.leftovers() == []
    if point == "download_partial":
        # The bytes that reached the disk before the crash are not fetched again.
        assert part_sizes and 0 < part_sizes[0] < 3_000_000
        assert [r.range_start for r in server.requests_for(MODEL_FILE)] == [part_sizes[0]]
        assert sum(r.sent for r in server.requests_for(MODEL_FILE)) == 3_000_000 - part_sizes[0]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_disk_full_during_download_leaves_no_partial_file(on_v1: Device) -> None:
    result = on_v1.cli("models", "pull", "--version", "2", preexec_fn=_limit_file_size)
    assert result.returncode == 1
    assert "edge-agent: store:" in result.stderr and "File too large" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert on_v1.leftovers() == []
    on_v1.assert_serving(1)


def _publish(
    fleet: Fleet, version: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    src = fleet.root / "src" / f"crash-{version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.tflite").write_bytes(tflite_bytes(50_000, version))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.fleet.cli",
            "publish",
            str(src / "model.tflite"),
            "--model",
            MODEL,
            "--version",
            str(version),
            "--registry",
            str(fleet.registry),
            "--sign-key",
            str(fleet.key),
            "--channel",
            "stable",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("point", PUBLISH_CRASH_POINTS)
def test_sigkill_during_publish_leaves_index_naming_complete_releases(
    fleet: Fleet, device: Device, point: str
) -> None:
    assert _publish(fleet, 1).returncode == 0
    crashed = _publish(fleet, 2, env={CRASH_ENV: point})
    assert crashed.returncode == -signal.SIGKILL
    index = json.loads((fleet.registry / MODEL / "index.json").read_bytes())
    assert index["versions"] == [1] and index["channels"] == {"stable": 1}
    # A device following the channel is not led to a half-published release.
    assert device.updater().pull().release.version == 1
    # Publishing again completes the job.
    again = _publish(fleet, 2)
    assert again.returncode == 0, again.stderr
    index = json.loads((fleet.registry / MODEL / "index.json").read_bytes())
    assert index["versions"] == [1, 2] and index["channels"] == {"stable": 2}
    assert not list((fleet.registry / MODEL).glob(".staging-*"))
    assert device.updater().pull().release.version == 2
    device.assert_serving(2)
