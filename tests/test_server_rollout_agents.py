"""A server-side rollout with real agents (``edge-agent run`` subprocesses, a synthetic
source, an HTTP registry, desired states signed by the server): the real ingester
stores their reports, the driver rolls v1 out to their group, is stopped after the
canary as a restarting server would be, and a new driver (another instance) finishes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.broker import BrokerOptions, FleetBroker
from agent.fleet.publish import publish
from agent.fleet.rollout import plan
from agent.server import rollstore
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.driver import RolloutDriver
from agent.server.ingest import Ingester, IngestOptions
from agent.server.schema import devices
from agent.verify import generate_keypair
from tests.agentproc import MODEL, AgentProcess
from tests.broker import Mosquitto, wait_until
from tests.conftest import Models
from tests.registry_server import RegistryServer

GROUP = "lab"
DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture
def registry_server(tmp_path: Path, models: Models) -> Iterator[RegistryServer]:
    registry = tmp_path / "registry"
    registry.mkdir()
    publish(
        [models.root / "v1.tflite"], model=MODEL, version=1, registry=registry,
        task="classification", labels=models.labels, selftest_random=2,
    )  # fmt: skip
    with RegistryServer(registry) as server:
        yield server


def _versions(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(devices.c.id, devices.c.version)).all()
    return {row.id: row.version for row in rows}


def test_real_agents_converge_on_a_server_rollout_across_a_driver_restart(
    tmp_path: Path,
    broker: Mosquitto,
    registry_server: RegistryServer,
    agents: list[AgentProcess],
) -> None:
    key, pub = generate_keypair(tmp_path / "keys", "deploy")
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    options = ServeOptions(
        "sqlite:///fleet.db", BrokerOptions(broker.url), IngestOptions("srv-a"), sign_key=key
    )
    ingester = Ingester(engine, options.broker, options.ingest)
    ingester.start()
    publisher = FleetBroker(BrokerOptions(broker.url))
    publisher.connect()
    drivers: list[RolloutDriver] = []
    try:
        for device in DEVICES:
            settings = {
                "device": {"id": device, "groups": [GROUP]},
                "registry": {"url": registry_server.url, "poll_interval_s": 3600},
                "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
                "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 8},
                "telemetry": {"interval_s": 0.5},
                "update": {"probation_s": 1, "budget_runs": 5, "desired_public_key": str(pub)},
            }
            agents.append(AgentProcess(tmp_path / device, device, settings).start())

        def members() -> list[str]:
            with engine.connect() as conn:
                return rollstore.members_of(conn, GROUP)

        assert wait_until(lambda: members() == sorted(DEVICES), 60), "agents not ingested"
        with engine.begin() as conn:
            rollout_id = rollstore.create(
                conn, who="ops", group=GROUP, model=MODEL, version=1, canary_pct=10,
                step_pct=50, timeout_s=60, members=members(), now=time.time(),
            )  # fmt: skip
        canary = plan(DEVICES, GROUP, 10, 50)[0][0]
        first = RolloutDriver(Server(options, engine, publisher), tick_s=0.2)
        first.start()
        drivers.append(first)

        def loaded() -> Any:
            with engine.connect() as conn:
                return rollstore.load(conn, rollout_id)

        assert wait_until(lambda: loaded()[1][0].status == "succeeded", 90), loaded()
        first.stop(5.0)  # the server restarts between the canary and step 1
        assert _versions(engine)[canary] == 1
        restarted = ServeOptions(
            options.db_url, options.broker, IngestOptions("srv-b"), sign_key=key
        )
        second = RolloutDriver(Server(restarted, engine, publisher), tick_s=0.2)
        second.start()
        drivers.append(second)
        assert wait_until(lambda: loaded()[0].status in ("succeeded", "halted"), 120), loaded()
        r, steps, rows = loaded()
        assert r.status == "succeeded", (r, rows)
        assert [s.status for s in steps] == ["succeeded", "succeeded"]
        assert wait_until(lambda: set(_versions(engine).values()) == {1}, 30), _versions(engine)
        canary_row = next(m for m in rows if m.device == canary)
        assert canary_row.seconds is not None and canary_row.outcome == "succeeded"
    finally:
        for driver in drivers:
            driver.stop(5.0)
        publisher.close()
        ingester.stop()
        engine.dispose()
