"""A server-side shadow rollout with real agents (``edge-agent run`` subprocesses, a
real mosquitto, the registry over HTTP, the colour classifier on the real interpreter),
submitted with ``edge-fleet rollout --server --shadow`` to the real app, driven by the
real driver from what the real ingester stored; instructions signed by the server.

Two devices in one group run v1.

- v2, the same model with its labels rotated, disagrees on every frame: the canary's
  trial fails, the rollout halts, the canary's instruction is cleared (its run stops,
  its figures stay), the other device never hears of it, both serve v1;
- v3 agrees, with ``promote_at``: each step passes its trials, then its devices are
  updated — across a server restart after the canary's trial; all run v3, and no
  instruction is left retained;
- v4 agrees, without ``promote_at``: the group's instruction (the same run) is set and
  the per-device ones cleared; no device is updated.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from agent import modelgen
from agent.fleet.broker import BrokerOptions, FleetBroker
from agent.fleet.cli import main as fleet_main
from agent.fleet.rollout import plan
from agent.server import rollstore
from agent.server.app import create_app
from agent.server.auth import create_token
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.driver import RolloutDriver
from agent.server.ingest import Ingester, IngestOptions
from agent.server.schema import devices, rollouts
from tests import test_fleet
from tests.agentproc import MODEL
from tests.broker import wait_until
from tests.serverhttp import call, running
from tests.test_fleet import GROUP, Lab
from tests.test_rollout_shadow import _publish, _retained_shadows, _runs

lab = test_fleet.lab  # the fixture: a registry, a deploy key, a broker, agents, a tap

DEVICES = ("dev-a", "dev-b")


class Fleet:
    """The fleet server's parts on the lab's broker: database, ingester, driver, app."""

    def __init__(self, lab: Lab) -> None:
        self.engine = open_database(f"sqlite:///{lab.root / 'fleet.db'}")
        self.options = ServeOptions(
            "sqlite:///fleet.db",
            BrokerOptions(lab.broker.url),
            IngestOptions("srv-a"),
            sign_key=lab.key,
        )
        self.ingester = Ingester(self.engine, self.options.broker, self.options.ingest)
        self.ingester.start()
        self.publisher = FleetBroker(BrokerOptions(lab.broker.url))
        self.publisher.connect()
        self.server = Server(self.options, self.engine, self.publisher)
        self.drivers = [RolloutDriver(self.server, tick_s=0.2)]
        self.drivers[0].start()
        with self.engine.begin() as conn:
            self.token = create_token(conn, "ops", "operator", time.time())

    def versions(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(devices.c.id, devices.c.version)).all()
        return {row.id: row.version for row in rows}

    def members(self) -> list[str]:
        with self.engine.connect() as conn:
            return rollstore.members_of(conn, GROUP, MODEL)

    def restart_when(self, condition: Callable[[], bool]) -> threading.Thread:
        """In the background: once ``condition`` holds, stop the driver as a restarting
        server would and start another instance's (it takes the lease and resumes)."""

        def restart() -> None:
            if not wait_until(condition, 60):
                return
            self.drivers[0].stop(5.0)
            options = replace(self.options, ingest=IngestOptions("srv-b"))
            second = RolloutDriver(Server(options, self.engine, self.publisher), tick_s=0.2)
            second.start()
            self.drivers.append(second)

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread

    def trial(self, device: str) -> str | None:
        """The trial of ``device`` in the newest rollout."""
        with self.engine.connect() as conn:
            newest = conn.execute(
                sa.select(rollouts.c.id).order_by(rollouts.c.created.desc()).limit(1)
            ).scalar()
            loaded = rollstore.load(conn, newest) if newest else None
        members = loaded[2] if loaded else []
        return next((m.trial for m in members if m.device == device), None)

    def close(self) -> None:
        for driver in self.drivers:
            driver.stop(5.0)
        self.publisher.close()
        self.ingester.stop()
        self.engine.dispose()


@pytest.fixture
def fleet(lab: Lab) -> Iterator[Fleet]:
    made = Fleet(lab)
    yield made
    made.close()


def _rollout(url: str, token: str, version: int, *args: str) -> list[str]:
    return [
        "rollout", "--model", MODEL, "--version", str(version), "--group", GROUP,
        "--canary", "50", "--step", "100", "--timeout", "60", "--server", url, "--token", token,
        "--shadow", "--sample", "100", "--min-frames", "8", *args,
    ]  # fmt: skip


def test_a_server_shadow_rollout_halts_on_disagreement_and_promotes_agreement(
    lab: Lab, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = list(modelgen.COLOUR_LABELS)
    lab.publish(1)
    for device in DEVICES:
        lab.agent(device).start()
    lab.wait(lambda: fleet.members() == sorted(DEVICES), 60, "two devices ingested")
    run = lab.rollout(1, "--timeout", "60")  # every device runs v1 (from the broker)
    assert run.code == 0, run.out + run.err
    assert wait_until(lambda: set(fleet.versions().values()) == {1}, 30), fleet.versions()
    canary, other = (d for step in plan(DEVICES, GROUP, 50, 100) for d in step)

    with running(create_app(fleet.server)) as url:
        # v2 disagrees: the canary's trial halts the rollout; its instruction is cleared
        _publish(lab, 2, "v2.tflite", labels[1:] + labels[:1])
        code = fleet_main([*_rollout(url, fleet.token, 2, "--promote-at", "0.9"), "--json"])
        out = capsys.readouterr()
        assert code == 1, out.out + out.err
        final = json.loads(out.out)
        assert final["status"] == "halted" and final["reason"] == f"canary failed on {canary}"
        assert f"{canary}: shadow failed (disagrees: top1 0 over" in out.err, out.err
        assert f"failed: {canary}: disagrees: top1 0 over" in out.err, out.err
        assert f"untouched: {other}" in out.err
        rows = {d["device"]: d for s in final["steps"] for d in s["devices"]}
        assert rows[canary]["trial"]["status"] == "failed"
        assert rows[canary]["trial"]["cleared"] is not None
        assert rows[canary]["status"] == "untouched"  # never sent the release
        assert rows[other]["trial"] is None
        assert final["options"]["shadow"]["promote_at"] == 0.9
        assert not lab.tap.docs(f"{other}/shadow/{MODEL}")  # never sent one
        assert not _retained_shadows(lab)
        lab.wait(
            lambda: (_runs(lab, canary) or [{}])[-1].get("phase") == "stopped",
            15,
            "the canary's shadow run stopped",
        )
        assert _runs(lab, canary)[-1]["frames"] >= 8  # its figures stay
        assert set(fleet.versions().values()) == {1}
        instruction = lab.tap.docs(f"{canary}/shadow/{MODEL}")[0]
        assert instruction["target"] == f"device:{canary}" and instruction["promote"] is None
        assert instruction["signature"]  # signed with the server's key

        # v3 agrees: each step passes its trials, then its devices are updated; the
        # server restarts once the canary's trial passed (another instance resumes)
        _publish(lab, 3, "v3.tflite", labels)
        restarter = fleet.restart_when(lambda: fleet.trial(canary) == "succeeded")
        code = fleet_main([*_rollout(url, fleet.token, 3, "--promote-at", "0.9"), "--json"])
        restarter.join(10)
        assert len(fleet.drivers) == 2  # it did restart mid-rollout
        out = capsys.readouterr()
        assert code == 0, out.out + out.err
        final = json.loads(out.out)
        assert final["status"] == "succeeded"
        assert "rollout (shadow first) of colours v3 to group lab: succeeded, 2 device(s)" \
            in out.err, out.err  # fmt: skip
        trials = [d["trial"] for s in final["steps"] for d in s["devices"]]
        assert all(t["status"] == "succeeded" and t["detail"].startswith("top1 1 over")
                   for t in trials), trials  # fmt: skip
        assert [d["status"] for s in final["steps"] for d in s["devices"]] == ["succeeded"] * 2
        assert wait_until(lambda: set(fleet.versions().values()) == {3}, 30), fleet.versions()
        assert not _retained_shadows(lab)

        # v4 agrees, without promote_at: the group's instruction takes the runs over
        _publish(lab, 4, "v1.tflite", labels)
        code = fleet_main(_rollout(url, fleet.token, 4))
        out = capsys.readouterr()
        assert code == 0, out.out + out.err
        assert "shadow rollout of colours v4 to group lab: succeeded, 2 device(s) run v4 in " \
            "the shadow" in out.out, out.out  # fmt: skip
        retained = _retained_shadows(lab)
        group = f"edge/groups/{GROUP}/shadow/{MODEL}"
        assert list(retained) == [group], retained
        per_device = [d for d in lab.tap.docs(f"{canary}/shadow/{MODEL}") if "raw" not in d][-1]
        assert retained[group]["issued_at"] == per_device["issued_at"]  # the same run
        assert retained[group]["target"] == f"group:{GROUP}" and retained[group]["version"] == 4
        assert set(fleet.versions().values()) == {3}  # no release

        # bad shadow options: one 422 line naming the field
        body = {"model": MODEL, "version": 4, "group": GROUP, "shadow": {"sample_pct": 0}}
        reply = call("POST", f"{url}/api/v1/rollouts", token=fleet.token, body=body)
        assert reply.status == 422, reply
        assert reply.body["detail"] == (
            "shadow.sample_pct: 0 is not a whole percentage from 1 to 100"
        )
