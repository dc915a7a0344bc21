"""The outbox under a real ``edge-agent run`` and a real mosquitto: a damaged outbox file
never stops the agent and never sends ``seq`` back; one agent per outbox and store.

Each case starts the agent, lets it publish, stops it, damages its outbox file the way a
power cut or a bad SD card would, and starts it again: it must come up, say what it did
(``state_repaired`` on the broker) and go on counting past every ``seq`` it used.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto

DEV = "dev-1"


def _agent(
    root: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess], **sections: Any
) -> AgentProcess:
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri()},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    agent = AgentProcess(root, DEV, settings)
    agents.append(agent)
    return agent


def _max_seq(path: Path, stream: str) -> int:
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (f"seq:{stream}",)).fetchone()
    finally:
        db.close()
    return int(row[0])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = os.urandom(100)  # the header: "file is not a database"
    data[len(data) // 2 : len(data) // 2 + 512] = os.urandom(512)
    path.write_bytes(bytes(data))


def _wrong_typed_row(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO messages (topic, payload, qos, retain, size) "
        "VALUES ('edge/dev-1/events', 'p', 'one', 'no', 'ten')"
    )
    db.commit()
    db.close()


def _counter_text(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE counters SET value = 'many' WHERE name = 'seq:telemetry'")
    db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('dropped', 'abc')")
    db.commit()
    db.close()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbled bytes": _garble,
    "a wrong-typed row": _wrong_typed_row,
    "a counter holding text": _counter_text,
    "truncated": _truncate,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_outbox_is_replaced_the_agent_stays_reachable_and_seq_keeps_rising(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess], damage: str
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = _agent(tmp_path / DEV, broker, registry, agents).start()
        wait_alive(lambda: len(tap.docs("/telemetry")) >= 3, 30, "telemetry", agent)
        assert agent.terminate() == 0
        path = agent.outbox_path
        last = {s: _max_seq(path, s) for s in ("telemetry", "events", "state")}
        seen = max(doc["seq"] for doc in tap.docs("/telemetry"))
        assert seen <= last["telemetry"]
        DAMAGE[damage](path)
        tap.messages.clear()

        agent.start()
        wait_alive(
            lambda: any(d.get("event") == "state_repaired" for d in tap.docs("/events")),
            30,
            "a state_repaired event",
            agent,
        )
        wait_alive(lambda: len(tap.docs("/telemetry")) >= 1, 15, "telemetry again", agent)
        wait_alive(
            lambda: any(d.get("state") == "online" for d in tap.docs("/status")),
            15,
            "online",
            agent,
        )
        (repaired,) = [d for d in tap.docs("/events") if d.get("event") == "state_repaired"]
        assert repaired["file"] == str(path) and repaired["action"].startswith("replaced; ")
        kept_as = Path(repaired["kept_as"])
        assert kept_as.parent == path.parent and kept_as.name.startswith("outbox.sqlite.damaged-")
        assert kept_as.exists()
        assert (
            repaired["lost"] == 1
            if damage == "a wrong-typed row"
            else repaired["lost"]
            in (
                "unknown",
                0,
            )
        )
        for stream in ("telemetry", "events", "state"):
            docs = [doc for topic, doc, _ in tap.messages if topic.endswith(f"/{stream}")]
            assert docs and min(d["seq"] for d in docs) > last[stream], stream
        assert agent.alive()
        assert agent.terminate() == 0
        assert "Traceback" not in agent.log()
    finally:
        tap.close()


# -- one agent per outbox and per store -------------------------------------------------


def _refused(agent: AgentProcess, within: float) -> str:
    """The one line a refused agent printed (it must exit 1 within ``within`` s)."""
    assert agent.proc is not None
    start = time.monotonic()
    code = agent.proc.wait(within)
    assert code == 1, agent.log()[-3000:]
    assert time.monotonic() - start < within
    lines = [line for line in agent.log().splitlines() if line.startswith("edge-agent:")]
    assert len(lines) == 1 and "Traceback" not in agent.log(), agent.log()[-3000:]
    return lines[0]


def _running(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess], tap: Tap
) -> AgentProcess:
    first = _agent(tmp_path / "first", broker, registry, agents).start()
    wait_alive(lambda: len(tap.docs("/telemetry")) >= 2, 30, "telemetry", first)
    return first


def _still_serving(first: AgentProcess, tap: Tap) -> None:
    count = len(tap.docs("/telemetry"))
    wait_alive(lambda: len(tap.docs("/telemetry")) >= count + 2, 15, "more telemetry", first)
    assert first.terminate() == 0


def test_a_second_agent_on_the_same_outbox_is_refused_at_once(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/telemetry"])
    try:
        first = _running(tmp_path, broker, registry, agents, tap)
        assert first.proc is not None
        second = _agent(  # its own store, the first one's outbox
            tmp_path / "second",
            broker,
            registry,
            agents,
            telemetry={"outbox": str(first.outbox_path)},
        ).start()
        line = _refused(second, within=15)
        assert line == (
            f"edge-agent: outbox: another agent (pid {first.proc.pid}) uses the outbox "
            f"{first.outbox_path}; stop it first (systemctl stop edge-agent)"
        )
        _still_serving(first, tap)
    finally:
        tap.close()


def test_a_second_agent_on_the_same_store_is_refused_at_once(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/telemetry"])
    try:
        first = _running(tmp_path, broker, registry, agents, tap)
        assert first.proc is not None
        store = first.settings["store"]["dir"]
        second = _agent(tmp_path / "second", broker, registry, agents, store={"dir": store})
        second.start()
        line = _refused(second, within=15)  # not after the 30 s a command-line pull gets
        assert line == (
            f"edge-agent: store: another agent (pid {first.proc.pid}) uses the store {store}; "
            "stop it first (systemctl stop edge-agent)"
        )
        assert not list(Path(store).glob("*.damaged-*"))
        _still_serving(first, tap)
    finally:
        tap.close()
