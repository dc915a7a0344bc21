"""``edge-agent run`` as a subprocess against a real mosquitto: kills, outages, commands.

Every figure comes from what a broker-side observer (``Tap``) received, or from the
agent's outbox file read with sqlite3 after a SIGKILL.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from tests.agentproc import AgentProcess, Tap, publish_models, seq_gaps, wait_alive
from tests.broker import Mosquitto, SecureBroker, subscriber
from tests.conftest import Models

DEV = "dev-1"


def _agent(
    tmp_path: Path,
    broker: Mosquitto,
    registry: Path,
    agents: list[AgentProcess],
    **sections: dict[str, Any],
) -> AgentProcess:
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri()},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    agents.append(agent)
    return agent


def _tap(broker: Mosquitto, suffix: str = "#") -> Tap:
    return Tap("127.0.0.1", broker.port, [f"edge/{DEV}/{suffix}"])


def _outbox_rows(path: Path) -> list[tuple[str, int]]:
    """(topic, seq) of every message in an outbox file, read by a separate connection."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT topic, payload FROM messages ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:  # the agent has created the file, not yet the tables
        rows = []
    finally:
        db.close()
    return [(topic, json.loads(payload)["seq"]) for topic, payload in rows]


def _outbox_counter(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:  # the agent has created the file, not yet the tables
        row = None
    finally:
        db.close()
    return int(row[0]) if row else 0


_wait = wait_alive


def test_last_will_says_offline_when_the_agent_is_killed(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    tap = _tap(broker, "status")
    try:
        agent = _agent(tmp_path, broker, registry, agents).start()
        _wait(lambda: any(d["state"] == "online" for d in tap.docs("/status")), 30, "online", agent)
        agent.kill()
        tap.wait(lambda: tap.docs("/status")[-1]["state"] == "offline", 10, "the Last Will")
        will = tap.docs("/status")[-1]
    finally:
        tap.close()
    assert will == {
        "schema": 1,
        "state": "offline",
        "ts": will["ts"],
        "reason": "lost",
        "groups": [],  # so the fleet side knows group members that are offline
        "agent_version": __version__,
    }
    late = subscriber(broker.url, [f"edge/{DEV}/status"])  # and it is retained
    try:
        assert json.loads(late.wait_for_topic(f"edge/{DEV}/status").payload)["state"] == "offline"
    finally:
        late.close()


def test_messages_in_the_outbox_of_a_killed_agent_arrive_after_restart(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    broker.stop()  # the agent records everything, sends nothing
    agent = _agent(tmp_path, broker, registry, agents).start()
    outbox = agent.outbox_path
    _wait(  # the first release is installed after a wait for retained desired state
        lambda: (
            outbox.exists()
            and len(rows := _outbox_rows(outbox)) >= 40
            and any(topic.endswith("/results") for topic, _ in rows)
        ),
        30,
        "40 messages in the outbox, results among them",
        agent,
    )
    agent.kill()
    kept = _outbox_rows(outbox)
    topics = {topic.rsplit("/", 1)[1] for topic, _ in kept}
    assert {"results", "telemetry"} <= topics, topics
    broker.start()
    tap = _tap(broker)
    try:
        agent.start()
        received = lambda: {(t, d["seq"]) for t, d, _ in list(tap.messages)}  # noqa: E731
        _wait(lambda: set(kept) <= received(), 30, "every message kept before the kill", agent)
        for stream in ("results", "telemetry"):
            assert seq_gaps(tap.docs(f"/{stream}")) == [], stream
    finally:
        tap.close()


def test_broker_killed_and_restarted_while_data_flows_loses_no_seq(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    # Broker persistence keeps the tap's session (and what is queued for it) across the
    # broker's SIGKILL; autosave on every change, since a SIGKILL skips the final save.
    with Mosquitto(
        tmp_path / "broker",
        persistence=True,
        extra_conf=["autosave_on_changes true", "autosave_interval 1", "max_queued_messages 0"],
    ) as broker:
        tap = _tap(broker)
        agent = _agent(tmp_path, broker, registry, agents).start()
        try:
            _wait(lambda: len(tap.docs("/results")) >= 20, 30, "20 results", agent)
            killed = time.time()
            broker.kill()
            time.sleep(1.5)  # results and telemetry keep coming, into the outbox
            restarted = time.time()
            broker.restart()
            seen = len(tap.docs("/results"))
            _wait(lambda: len(tap.docs("/results")) >= seen + 60, 30, "results after", agent)
            _wait(
                lambda: tap.docs("/telemetry")[-1]["mqtt"]["connects"] >= 2, 10, "reconnect", agent
            )
        finally:
            tap.close()
        assert agent.terminate() == 0
    results, telemetry = tap.docs("/results"), tap.docs("/telemetry")
    assert seq_gaps(results) == [] and seq_gaps(telemetry) == []
    assert min(d["seq"] for d in results) == 1
    during = [d for d in results if killed < d["ts"] < restarted]
    assert len(during) >= 15  # ~20 fps for 1.5 s with no broker: kept, then delivered


def test_outbox_cap_drops_the_oldest_and_reports_the_count(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    broker.stop()
    agent = _agent(
        tmp_path,
        broker,
        registry,
        agents,
        telemetry={"outbox_max_mb": 0.03},
    ).start()
    outbox = agent.outbox_path
    _wait(
        lambda: (
            outbox.exists()
            and _outbox_counter(outbox, "dropped") >= 20
            and _outbox_counter(outbox, "seq:results") >= 150
        ),  # more than 30 KB of results
        30,
        "20 messages dropped by the cap, 150 results recorded",
        agent,
    )
    broker.start()
    tap = _tap(broker)
    try:
        tap.wait(
            lambda: any(d["outbox"]["dropped"] >= 20 for d in tap.docs("/telemetry")),
            30,
            "telemetry reporting the drops",
        )
        tap.wait(lambda: len(tap.docs("/results")) >= 20, 30, "results")
    finally:
        tap.close()
    results = tap.docs("/results")
    assert min(d["seq"] for d in results) > 1  # the oldest went
    assert seq_gaps(results) == []  # and nothing after them


def _command(
    broker: Mosquitto, name: str, body: dict[str, Any], timeout: float = 30.0
) -> dict[str, Any]:
    asker = subscriber(broker.url, ["fleet/replies"])
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "fleet/replies"
        props.CorrelationData = name.encode()
        asker.publish(f"edge/{DEV}/cmd/{name}", json.dumps(body), properties=props)
        reply = asker.wait_for(lambda ms: len(ms) >= 1, timeout=timeout)[0]
        doc: dict[str, Any] = json.loads(reply.payload)
        return doc
    finally:
        asker.close()


def test_check_updates_and_rollback_commands_switch_the_served_model(
    tmp_path: Path,
    broker: Mosquitto,
    registry: Path,
    models: Models,
    agents: list[AgentProcess],
) -> None:
    tap = _tap(broker)
    agent = _agent(tmp_path, broker, registry, agents).start()
    try:
        _wait(lambda: any(d["version"] == 1 for d in tap.docs("/results")), 30, "v1", agent)
        pong = _command(broker, "ping", {"id": 7})
        assert pong["ok"] and pong["request_id"] == 7 and pong["command"] == "ping"
        assert pong["result"]["pong"] and pong["result"]["version"] == 1
        publish_models(registry, models.root, (2,))
        reply = _command(broker, "check-updates", {})
        assert reply["ok"] and reply["result"] == {"version": 2, "changed": True}, reply
        _wait(lambda: tap.docs("/results")[-1]["version"] == 2, 10, "v2 results", agent)
        # The retained state follows the swap; on a slow board (or emulated) a moment later.
        _wait(lambda: tap.docs("/state")[-1]["version"] == 2, 10, "v2 in the state", agent)

        def events() -> list[str]:
            return [d["event"] for d in tap.docs("/events")]

        # A rollback during probation ends the update rolled back, not succeeded: wait for
        # the probation's end (a slow board, or emulation, can take longer than the 1 s).
        _wait(lambda: "update_succeeded" in events(), 30, "v2 through probation", agent)
        reply = _command(broker, "rollback", {})
        assert reply["ok"] and reply["result"] == {"version": 1, "from": 2}, reply
        _wait(lambda: tap.docs("/results")[-1]["version"] == 1, 10, "v1 results again", agent)
        state = tap.docs("/state")[-1]
        assert state["version"] == 1 and state["previous"] == 2 and state["backend"] == "cpu"
        _wait(lambda: "rolled_back" in events(), 10, "the rolled_back event", agent)
        reply = _command(broker, "rollback", {"version": "two"})
        assert not reply["ok"] and reply["error"] == "version: must be a positive integer"
    finally:
        tap.close()
    assert agent.terminate() == 0


def test_agent_over_mutual_tls_reports_and_answers_under_its_own_topics(
    tmp_path: Path, secure_broker: SecureBroker, registry: Path, agents: list[AgentProcess]
) -> None:
    admin = secure_broker.client("fleet", ["edge/#"])
    try:
        settings: dict[str, Any] = {
            "registry": {"url": registry.as_uri()},
            "mqtt": {**secure_broker.agent_mqtt("dev-a"), "reconnect_max_s": 1},
        }
        agent = AgentProcess(tmp_path / "dev-a", "dev-a", settings).start()
        agents.append(agent)
        _wait(lambda: bool(admin.messages("edge/dev-a/telemetry")), 30, "dev-a telemetry", agent)
        assert admin.publish("edge/dev-a/cmd/ping", b'{"id": "t1"}') == "Success"
        reply = json.loads(admin.wait_for_topic("edge/dev-a/reply", timeout=10).payload)
        assert reply["ok"] and reply["request_id"] == "t1"
        status = json.loads(admin.messages("edge/dev-a/status")[-1].payload)
        assert status["state"] == "online"
        assert agent.terminate() == 0
    finally:
        admin.close()
