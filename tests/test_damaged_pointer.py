"""A damaged ``active.json`` never bricks the device.

Truncated, garbled or wrong-typed pointers, or one naming a release that is gone: the
store moves the file aside (``active.json.damaged-*``), makes the release active
before it active again when its own history names one that is stored and whole, else
none, and records what it did. The daemon (a real ``edge-agent run`` against a real
mosquitto and registry) starts, raises ``state_repaired``, stays up, answers
``status``, and gets back to the channel's release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.errors import StoreError
from agent.pull import Updater
from agent.registry import Registry
from agent.store import POINTER, Store, parse_pointer
from tests.agentproc import MODEL, AgentProcess, Tap, publish_models, wait_alive
from tests.broker import Mosquitto, subscriber
from tests.conftest import Models

SHA = "a" * 64
GOOD = {"schema": 1, "model": "m", "version": 2, "manifest_sha256": SHA, "history": [1, 2]}


def _doc(**change: Any) -> bytes:
    return json.dumps({**GOOD, **change}).encode()


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (_doc()[:25], "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", "a list, not an object"),
        (b"\x00" * 40, "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON (nested too deeply)"),
        (_doc(version="2"), "version is a str, expected a int"),
        (_doc(version=True), "version is a bool, expected a int"),
        (_doc(version=0), "version 0 is not a version"),
        (_doc(model=None), "model is a NoneType, expected a str"),
        (_doc(model="../../etc"), "model '../../etc' is not a model name"),
        (_doc(manifest_sha256="x"), "manifest_sha256 is not a SHA-256"),
        (_doc(history={"1": 1}), "history is a dict, expected a list"),
        (_doc(history=[1, "2"]), "history holds other than versions"),
        (b'{"model": "m", "version": NaN}', "NaN is not JSON"),
    ],
)
def test_damaged_pointer_document_is_refused_with_what_is_wrong(raw: bytes, said: str) -> None:
    with pytest.raises(StoreError) as caught:
        parse_pointer(raw, "active.json")
    message = str(caught.value)
    assert message.startswith("active.json: damaged pointer: ") and said in message
    assert "\n" not in message


def test_good_pointer_document_is_read_with_its_history() -> None:
    pointer = parse_pointer(_doc(rolled_back=[3]), "active.json")
    assert (pointer.model, pointer.version, pointer.history, pointer.rolled_back) == (
        "m",
        2,
        [1, 2],
        [3],
    )
    assert parse_pointer(pointer.to_json(), "x") == pointer


# -- the store and the daemon, with real releases ------------------------------------------

DEV = "dev-ptr"


def _truncate(store: Path) -> None:
    raw = (store / POINTER).read_bytes()
    (store / POINTER).write_bytes(raw[: len(raw) // 2])


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda store: (store / POINTER).write_bytes(data)


def _retype(store: Path) -> None:
    doc = json.loads((store / POINTER).read_bytes())
    doc.update(version=str(doc["version"]), history="1,2")
    (store / POINTER).write_bytes(json.dumps(doc).encode())


def _release_gone(store: Path) -> None:
    shutil.rmtree(store / "releases" / MODEL / "2")


def _traversal(store: Path) -> None:
    doc = json.loads((store / POINTER).read_bytes())
    doc["model"] = "../../../tmp"
    (store / POINTER).write_bytes(json.dumps(doc).encode())


DAMAGE: dict[str, tuple[Callable[[Path], None], str, int | None]] = {
    # name: (damage, the problem as reported, the version active after the repair)
    "truncated": (_truncate, "not valid JSON", None),
    "empty list": (_write(b"[]"), "a list, not an object", None),
    "wrong types": (_retype, "version is a str", None),
    "NUL bytes": (_write(b"\x00" * 300), "not valid JSON", None),
    "model as a path": (_traversal, "is not a model name", None),
    "release gone": (_release_gone, f"names {MODEL} v2, which is not in the store", 1),
}


def _agent(
    tmp_path: Path, models: Models, broker: Mosquitto | None, **sections: Any
) -> AgentProcess:
    """A device that ran v1 then v2 (the channel's), so its pointer's history is [1, 2]."""
    registry = tmp_path / "registry"
    publish_models(registry, models.root, (1, 2))
    settings: dict[str, Any] = {
        "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
        **sections,
    }
    if broker is not None:
        settings["mqtt"] = {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5}
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    config = load_config(agent.config_path, env={})
    store = Store(config.store.dir).open()
    registry_client = Registry.from_config(config.registry)
    try:
        for version in (1, 2):
            Updater(config, store, registry_client).pull(version)
    finally:
        registry_client.close()
    return agent


@pytest.mark.parametrize("case", list(DAMAGE))
def test_store_repairs_a_damaged_pointer_on_taking_the_lock(
    tmp_path: Path, models: Models, case: str
) -> None:
    damage, problem, after = DAMAGE[case]
    agent = _agent(tmp_path, models, None)
    store = Store(Path(agent.settings["store"]["dir"])).open()
    damage(store.root)
    damaged = (store.root / POINTER).read_bytes()
    repairs = store.repair()
    assert len(repairs) == 1 and repairs[0].file == str(store.root / POINTER)
    assert problem in repairs[0].problem
    kept = list(store.root.glob(f"{POINTER}.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # for forensics
    active = store.active()
    assert (active.version if active else None) == after
    if after is not None:
        assert f"{MODEL} v{after} is active again" in repairs[0].action
        assert store.pointer() is not None and store.pointer().history == [1]  # type: ignore[union-attr]
    else:
        assert "serving nothing" in repairs[0].action
    assert store.repair() == []  # repaired once: the store is consistent now


@pytest.mark.parametrize("case", list(DAMAGE))
def test_agent_starts_on_a_damaged_pointer_reports_it_and_recovers(
    tmp_path: Path, models: Models, broker: Mosquitto, agents: list[AgentProcess], case: str
) -> None:
    damage, problem, after = DAMAGE[case]
    agent = _agent(tmp_path, models, broker)
    agents.append(agent)
    store_dir = Path(agent.settings["store"]["dir"])
    damage(store_dir)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent.start()
        wait_alive(
            lambda: any(d["event"] == "state_repaired" for d in tap.docs("/events")),
            30,
            "a state_repaired event",
            agent,
        )
        event = next(d for d in tap.docs("/events") if d["event"] == "state_repaired")
        assert event["file"] == str(store_dir / POINTER) and problem in event["problem"]
        assert ("is active again" if after else "serving nothing") in event["action"]
        status = agent_status(agent)
        assert status.returncode == 0, status.stderr
        # the channel (stable: v2) brings the device back through the full gate
        wait_alive(
            lambda: [r["version"] for r in tap.docs("/results")][-3:] == [2, 2, 2],
            60,
            "results from v2 again",
            agent,
        )
        assert agent.alive()
        assert agent.terminate() == 0
    finally:
        tap.close()
    assert "Traceback" not in agent.log()
    assert parse_pointer((store_dir / POINTER).read_bytes(), "active.json").version == 2


def agent_status(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    """``edge-agent status --json`` as an operator runs it beside the agent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--json", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_pinned_device_whose_pointer_is_lost_applies_its_desired_state_again(
    tmp_path: Path, models: Models, broker: Mosquitto, agents: list[AgentProcess]
) -> None:
    """Pinned to v1 by the fleet, then the pointer is lost: the retained instruction is
    the one already applied, so it must be applied again (through the gate), not skipped
    as done while the device serves nothing."""
    agent = _agent(tmp_path, models, broker, update={"probation_s": 2})
    agents.append(agent)
    store_dir = Path(agent.settings["store"]["dir"])
    desired = {"schema": 1, "model": MODEL, "version": 1, "issued_at": time.time()}
    fleet = subscriber(broker.url, [])
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        fleet.publish(f"edge/{DEV}/desired", json.dumps(desired).encode(), retain=True)
        agent.start()
        serving_v1 = lambda: [r["version"] for r in tap.docs("/results")][-3:] == [1, 1, 1]  # noqa: E731
        succeeded = lambda: any(  # noqa: E731
            d["event"] == "update_succeeded" and d["version"] == 1 for d in tap.docs("/events")
        )
        wait_alive(succeeded, 60, "the desired v1 applied (probation passed)", agent)
        assert agent.terminate() == 0
        _truncate(store_dir)
        tap.messages.clear()
        agent.start()
        wait_alive(serving_v1, 60, "the desired v1 serving again after the repair", agent)
        assert agent.terminate() == 0
    finally:
        tap.close()
        fleet.close()
    assert parse_pointer((store_dir / POINTER).read_bytes(), "active.json").version == 1


def test_status_without_an_agent_shows_a_damaged_pointer_and_exits_0(
    tmp_path: Path, models: Models
) -> None:
    agent = _agent(tmp_path, models, None)
    _truncate(Path(agent.settings["store"]["dir"]))
    result = agent_status(agent)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert "damaged pointer" in doc["store_error"] and doc["daemon"]["running"] is False
