"""The device–fleet contract (agent/contract.py) against its page and a real agent.

docs/protocol.md lists the event names, update phases, outcomes, sources and status
states in prose and tables; these tests read them from the page and compare them with
the contract's Literals in both directions, so neither can change alone. Then a real
``edge-agent run`` against mosquitto: every status, state, telemetry, event and result
it publishes validates against the contract's strict models, and the fleet tools'
reader (agent/fleet/reports.py) takes each without dropping a field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_type_hints

import pydantic
import pytest

from agent import contract
from agent.fleet import reports
from tests.agentproc import AgentProcess, Tap, wait_alive
from tests.broker import Mosquitto

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
DEV = "dev-contract"


def _section(text: str, heading: str) -> str:
    """The body of the markdown section ``heading`` (up to the next heading)."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ )", text, re.M | re.S)
    assert match, heading
    return match.group(1)


def _ticks(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _after(text: str, start: str, end: str = ";") -> str:
    """The text between ``start`` and the next ``end``, whitespace joined."""
    flat = " ".join(text.split())
    i = flat.index(start) + len(start)
    return flat[i : flat.index(end, i)]


def documented() -> dict[str, set[str]]:
    """The enumerated values as docs/protocol.md states them."""
    text = PROTOCOL.read_text()
    events: set[str] = set()
    for line in _section(text, "events").splitlines():
        cells = line.split("|")
        if line.startswith("| `") and len(cells) > 2:
            events.update(_ticks(cells[1]))
    state = _section(text, "state")
    phases = set(_ticks(_after(state, "`phase` one of")))
    outcomes = set(_ticks(_after(state, "`outcome` `null` while running, then")))
    sources = {
        s.split(":")[0]
        for s in _ticks(_after(state, "`source` is"))
        if re.fullmatch(r"[a-z-]+(:NAME)?", s)
    }
    state_phases = set(_ticks(_after(state, "then its outcome;", "."))) | phases | outcomes
    status_row = next(
        line for line in _section(text, "MQTT topics").splitlines() if "/status`" in line
    )
    return {
        "events": events,
        "phases": phases,
        "outcomes": outcomes,
        "state phases": state_phases,
        "sources": sources,
        "status states": set(re.findall(r'"state":"(\w+)"', status_row)),
        "offline reasons": set(re.findall(r'"reason":"(\w+)"', status_row)),
    }


CONTRACT: dict[str, tuple[str, ...]] = {
    "events": contract.EVENT_NAMES,
    "phases": contract.UPDATE_PHASES,
    "outcomes": contract.UPDATE_OUTCOMES,
    "state phases": contract.STATE_PHASES,
    "sources": contract.SOURCE_KINDS,
    "status states": contract.STATUS_STATES,
    "offline reasons": contract.OFFLINE_REASONS,
}


@pytest.mark.parametrize("what", list(CONTRACT))
def test_protocol_page_and_contract_list_the_same_values(what: str) -> None:
    on_page = documented()[what]
    in_code = set(CONTRACT[what])
    assert on_page, f"docs/protocol.md: no {what} found (did the page's wording change?)"
    assert on_page - in_code == set(), f"{what} documented but not in agent/contract.py"
    assert in_code - on_page == set(), f"{what} in agent/contract.py but not documented"


def test_protocol_page_names_the_contract_module() -> None:
    assert "agent/contract.py" in PROTOCOL.read_text()


# The fleet reader's schema, stream by stream, against the contract's documents.
_READS: dict[str, type[Any]] = {
    "status": contract.StatusMessage,
    "state": contract.StateMessage,
    "telemetry": contract.TelemetryMessage,
    "events": contract.EventMessage,
    "results": contract.ResultMessage,
}


def _fields_outside(schema: dict[str, Any], doc: type[Any], path: str) -> list[str]:
    hints = get_type_hints(doc)
    out: list[str] = []
    for name, kind in schema.items():
        if name not in hints:
            out.append(f"{path}.{name}")
        elif isinstance(kind, dict):
            nested = [
                t
                for t in getattr(hints[name], "__args__", (hints[name],))
                if isinstance(t, type) and t is not type(None)
            ]
            assert nested, f"{path}.{name} is an object in reports.py, not in the contract"
            out += _fields_outside(kind, nested[0], f"{path}.{name}")
    return out


@pytest.mark.parametrize("stream", list(_READS))
def test_every_field_the_fleet_reads_is_a_field_of_the_contract(stream: str) -> None:
    assert _fields_outside(reports.SCHEMAS[stream], _READS[stream], stream) == []


@pytest.mark.parametrize(
    ("stream", "doc", "problem"),
    [
        ("state", {"phase": "sucessful"}, "state.phase: 'sucessful' is not one of"),
        ("state", {"update": {"phase": "idle"}}, "state.update.phase: 'idle' is not one of"),
        ("state", {"update": {"outcome": "ok"}}, "state.update.outcome: 'ok' is not one of"),
        ("status", {"state": "maybe"}, "status.state: 'maybe' is not one of"),
        ("status", {"state": "offline", "reason": "x"}, "status.reason: 'x' is not one of"),
        ("events", {"event": "update_sucess"}, "events.event: 'update_sucess' is not one of"),
        ("events", {"event": "\x1b[31m"}, "events.event: '\\\\x1b[31m' is not one of"),
    ],
)
def test_the_fleet_drops_an_enumerated_field_the_contract_does_not_know(
    stream: str, doc: dict[str, Any], problem: str
) -> None:
    cleaned, problems = reports.clean(stream, doc)
    assert any(p.startswith(problem) for p in problems), problems
    field = problem.split(":")[0].split(".")[1:]
    holder = cleaned if len(field) == 1 else cleaned[field[0]]
    assert field[-1] not in holder


@pytest.mark.parametrize(
    ("stream", "doc"),
    [
        ("state", {"phase": "rolled_back", "update": {"phase": "probation", "outcome": None}}),
        ("status", {"state": "offline", "reason": "lost"}),
        ("events", {"event": "update_succeeded"}),
    ],
)
def test_the_fleet_keeps_the_contracts_values(stream: str, doc: dict[str, Any]) -> None:
    assert reports.clean(stream, doc) == (doc, [])


UPDATE = {
    "id": "u1",
    "model": "m",
    "version": 2,
    "source": "group:yard",
    "issued_at": 1.0,
    "phase": "probation",
    "outcome": None,
    "reason": None,
    "started_at": 1.0,
    "deadline_s": None,
    "retry": None,
}


@pytest.mark.parametrize(
    ("stream", "change"),
    [
        ("state", {"version": "1"}),  # strict: no coercion
        ("state", {"phase": "done"}),
        ("state", {"unknown": 1}),  # extra keys refused
        ("state", {"runtime": {"interpreters": 2, "threads": 1, "chosen_by": "guess"}}),
        ("state", {"update": {**UPDATE, "source": "group:a/b"}}),
        ("state", {"update": {**UPDATE, "outcome": "ok"}}),
        ("status", {"state": "away"}),
        ("events", {"event": "update_sucess"}),
        ("telemetry", {"mqtt": {"connected": "yes"}}),
    ],
)
def test_the_contract_models_refuse_what_the_contract_does_not_allow(
    stream: str, change: dict[str, Any]
) -> None:
    good: dict[str, dict[str, Any]] = {
        "state": {
            "schema": 1,
            "seq": 1,
            "id": "a",
            "ts": 1.0,
            "agent_version": "0.1.0",
            "model": "m",
            "version": 1,
            "sha256": None,
            "backend": "cpu",
            "serving": 1,
            "previous": None,
            "phase": "idle",
            "last_error": None,
            "update": None,
            "desired": None,
            "bad": [],
        },
        "status": {"schema": 1, "ts": 1.0, "state": "offline", "reason": "lost"},
        "events": {"schema": 1, "seq": 1, "id": "a", "ts": 1.0, "event": "agent_started"},
        "telemetry": {
            "schema": 1,
            "seq": 1,
            "id": "a",
            "ts": 1.0,
            "inference": None,
            "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
            "mqtt": {
                "connected": True,
                "protocol": "5",
                "connects": 1,
                "inflight": 0,
                "rejected": 0,
                "unsent_qos0": 0,
            },
        },
    }
    contract.validator(stream).validate_python(good[stream])
    contract.validator("state").validate_python({**good["state"], "update": UPDATE})
    runtime = {"interpreters": 2, "threads": 1, "chosen_by": "calibration", "note": None}
    contract.validator("state").validate_python({**good["state"], "runtime": runtime})
    with pytest.raises(pydantic.ValidationError):
        contract.validator(stream).validate_python({**good[stream], **change})


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("device", "device"),
        ("group:yard", "group"),
        ("channel:stable", "channel"),
        ("local", "local"),
        ("local-offline", "local-offline"),
        ("group:", None),
        ("group:a/b", None),
        ("fleet", None),
    ],
)
def test_source_kind(source: str, kind: str | None) -> None:
    assert contract.source_kind(source) == kind


def test_what_a_real_agent_publishes_is_the_contract(
    tmp_path: Path, broker: Mosquitto, registry: Path, agents: list[AgentProcess]
) -> None:
    """A real agent installs v1 from the registry, serves, reports and stops cleanly:
    every document it published validates, and the fleet reader drops nothing."""
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri()},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
    }
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    agents.append(agent)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent.start()

        def succeeded() -> bool:
            return any(d.get("event") == "update_succeeded" for d in tap.docs("/events"))

        wait_alive(succeeded, 60, "update_succeeded", agent)
        wait_alive(lambda: len(tap.docs("/telemetry")) >= 2, 30, "telemetry", agent)
        wait_alive(lambda: len(tap.docs("/results")) >= 1, 30, "results", agent)
        assert agent.terminate() == 0
        tap.wait(
            lambda: any(d.get("reason") == "stopped" for d in tap.docs("/status")),
            10,
            "the offline status",
        )
        agent.start()  # again, then killed: the broker publishes the Last Will
        online = len([d for d in tap.docs("/status") if d.get("state") == "online"])
        wait_alive(
            lambda: len([d for d in tap.docs("/status") if d.get("state") == "online"]) > online,
            30,
            "online again",
            agent,
        )
        agent.kill()
        tap.wait(
            lambda: any(d.get("reason") == "lost" for d in tap.docs("/status")), 20, "the Will"
        )
    finally:
        tap.close()

    seen: dict[str, int] = {}
    for topic, doc, _ in tap.messages:
        stream = topic.removeprefix(f"edge/{DEV}/")
        assert stream in contract.MESSAGES, topic
        contract.validator(stream).validate_python(doc)
        if stream in reports.SCHEMAS:
            assert reports.clean(stream, doc) == (doc, []), (stream, doc)
        seen[stream] = seen.get(stream, 0) + 1
    assert set(seen) == {"status", "state", "telemetry", "events", "results"}, seen
    events = {d["event"] for d in tap.docs("/events")}
    assert {"agent_started", "update_started", "update_phase", "update_succeeded"} <= events
    assert "agent_stopped" in events
    states = tap.docs("/state")
    assert {"downloading", "probation", "succeeded"} <= {s["phase"] for s in states}
    # how the serving model runs: as configured (one interpreter by default)
    serving = [s["runtime"] for s in states if s.get("runtime")]
    assert serving and serving[-1]["interpreters"] == 1
    assert serving[-1]["chosen_by"] == "config" and serving[-1]["note"] is None
