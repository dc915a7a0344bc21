"""``edge-agent demo``, the README's first command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.agentproc import Tap
from tests.broker import Mosquitto


def test_demo_swaps_to_the_second_release_without_stopping_and_reports_to_a_broker(
    broker: Mosquitto,
) -> None:
    tap = Tap("127.0.0.1", broker.port, ["edge/demo-device/#"])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "demo", "--seconds", "14", "--json"]
            + ["--broker", broker.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in done.stdout.splitlines()]
        versions = [r["version"] for r in records if r["stream"] == "results"]
        assert versions[0] == 1 and versions[-1] == 2
        switch = versions.index(2)
        assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}  # one switch
        frames = [r["frame"] for r in records if r["stream"] == "results"]
        assert frames == list(range(len(frames)))  # not one frame lost across the swap
        succeeded = [
            r["version"]
            for r in records
            if r["stream"] == "events" and r["event"] == "update_succeeded"
        ]
        assert succeeded == [1, 2]
        tap.wait(lambda: any(d.get("version") == 2 for d in tap.docs("/results")), 10, "v2 on MQTT")
        assert any(d.get("version") == 1 for d in tap.docs("/results"))
    finally:
        tap.close()


def test_demo_refuses_a_used_keep_folder_as_bad_usage(tmp_path: Path) -> None:
    (tmp_path / "left-over").write_text("from an earlier run")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "--keep" in run.stderr and "not empty" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["left-over"]
