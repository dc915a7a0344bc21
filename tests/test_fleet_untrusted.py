"""The fleet tools treat devices as untrusted (issue 14, class 10).

Fake devices leave hostile retained reports on a real mosquitto — JSON nested
thousands deep, NaN, integers of thousands of digits, bytes that are not UTF-8,
duplicate keys, wrong types, terminal escape sequences, huge strings, times out of
range, topics whose device id is not one — next to good devices. ``edge-fleet
devices``, ``devices --json``, ``status --model`` and a ``rollout`` (with a real agent)
must work for the good ones, print nothing a device supplied raw, and name each bad
device once in a warning on stderr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agentproc import MODEL, wait_alive
from tests.broker import Mosquitto, subscriber
from tests.test_fleet import Lab, lab, run_fleet  # noqa: F401  (lab: the fixture)

NOW = -12345.5  # stands for "the moment the report is left", stamped by _leave
ESC = "\x1b[2J\x1b]0;owned\x07"  # clear the screen, set the window title


def _good(device: str, group: str) -> dict[str, Any]:
    return {
        "status": {"ts": NOW, "state": "online", "groups": [group], "agent_version": "0.1.0"},
        "state": {"ts": NOW, "model": MODEL, "version": 1, "phase": "idle", "backend": "cpu"},
        "telemetry": {"ts": NOW, "temp_c": 41.5, "inference": {"fps": 9.5, "backend": "cpu"}},
    }


def _deep(n: int) -> bytes:
    return b'{"state": "online", "groups": ["yard"], "x": ' + b"[" * n + b"]" * n + b"}"


# device -> stream -> document (dict) or raw bytes
HOSTILE: dict[str, dict[str, Any]] = {
    "bad-deep": {"status": _deep(5000), "state": b'{"model": ' + b"[" * 100_000},
    "bad-types": {
        "status": {"ts": NOW, "state": {}, "groups": "abc"},
        "state": {"ts": NOW, "model": MODEL, "version": "1; rm", "phase": 7, "update": []},
        "telemetry": {"ts": "now", "inference": {"fps": "fast"}, "outbox": {"depth": {}}},
    },
    "bad-esc": {
        "status": {"ts": NOW, "state": "online", "groups": ["yard"], "agent_version": ESC},
        "state": {
            "ts": NOW,
            "model": MODEL,
            "version": 1,
            "backend": "\x1b[5mcpu",
            "phase": "failed",
            "update": {"version": 1, "reason": ESC + "x" * 100_000},
            "last_error": ESC * 1000,
            "bad": [f"{MODEL}@{ESC}"],
        },
        "telemetry": {"ts": NOW, "temp_c": 1e308, "inference": {"backend": "\u202e\x9bcpu"}},
    },
    "bad-nan": {
        "status": b'{"state": "online", "groups": ["yard"], "ts": 1e400}',
        "state": b'{"model": "colours", "version": NaN}',
    },
    "bad-int": {"status": b'{"state": "online", "ts": ' + b"9" * 5000 + b"}"},
    "bad-utf8": {"status": b'{"state": "online", "groups": ["\xff\xfe"]}'},
    "bad-dup": {"state": b'{"model": "colours", "model": "other", "version": 1}'},
    "bad-time": {
        "status": {"ts": -1e300, "state": "online", "groups": ["yard"]},
        "state": {"ts": 1e300, "model": MODEL, "version": 1},
        "desired": {"model": MODEL, "version": 1, "issued_at": 1e300},
    },
    "a\u202eb": {"status": {"ts": NOW, "state": "online", "groups": ["yard"]}},
    "x y": {"status": {"ts": NOW, "state": "online", "groups": ["yard"]}},
}
BAD = [d for d in HOSTILE if d.startswith("bad-") and d != "bad-time"]  # times: well-typed


def _stamped(doc: Any, now: float) -> Any:
    """``doc`` with every NOW replaced by ``now``: reports are fresh when left, not when
    this module was imported (``devices`` hides telemetry older than five minutes)."""
    if isinstance(doc, dict):
        return {key: _stamped(value, now) for key, value in doc.items()}
    if isinstance(doc, list):
        return [_stamped(value, now) for value in doc]
    return now if doc == NOW and isinstance(doc, float) else doc


def _leave(broker: Mosquitto, reports: dict[str, dict[str, Any]]) -> None:
    """Publish every report retained, each acknowledged by the broker."""
    operator = subscriber(broker.url, [])
    try:
        for device, streams in reports.items():
            for stream, doc in streams.items():
                fresh = _stamped(doc, time.time())
                payload = doc if isinstance(doc, bytes) else json.dumps(fresh).encode()
                sent = operator.publish(f"edge/{device}/{stream}", payload, retain=True)
                assert sent in ("Success", "No matching subscribers"), (device, stream, sent)
    finally:
        operator.close()


def _clean(text: str) -> None:
    """Nothing a device supplied reached the terminal raw; no bug surfaced."""
    assert text.replace("\n", "").isprintable(), [c for c in text if not c.isprintable()][:5]
    assert "Traceback" not in text and "internal error" not in text, text


def _warned(err: str) -> None:
    """Each bad device, and each topic with an invalid device id, named exactly once."""
    lines = err.splitlines()
    for device in BAD:
        named = [line for line in lines if f"device {device}:" in line]
        assert len(named) == 1, (device, lines)
        assert named[0].startswith("edge-fleet: warning: "), named
    for topic in ("edge/a\\u202eb/status", "edge/x y/status"):
        assert [line for line in lines if topic in line and "not a valid device id" in line]
    assert not [line for line in lines if "good-" in line], lines


@pytest.fixture
def fleet(broker: Mosquitto) -> Iterator[Mosquitto]:
    _leave(broker, {"good-1": _good("good-1", "yard"), "good-2": _good("good-2", "yard")})
    _leave(broker, HOSTILE)
    yield broker


def test_devices_lists_the_good_devices_and_names_each_hostile_one_once(fleet: Mosquitto) -> None:
    run = run_fleet("devices", "--broker", fleet.url)
    assert run.code == 0, run.err
    _clean(run.out + run.err)
    _warned(run.err)
    rows = {line.split()[0]: line for line in run.out.splitlines()[1:]}
    assert {"good-1", "good-2", "bad-esc", "bad-types", "bad-time"} <= set(rows), run.out
    assert "bad-deep" not in rows  # nothing usable from it
    assert f"{MODEL}@1" in rows["good-1"] and "9.5" in rows["good-1"] and "41.5" in rows["good-1"]
    assert "\\x1b[2J" in rows["bad-esc"]  # shown escaped, and cut
    assert all(len(line) < 64 * 11 + 2 * 11 for line in run.out.splitlines())

    as_json = run_fleet("devices", "--broker", fleet.url, "--json", "--group", "yard")
    assert as_json.code == 0, as_json.err
    _clean(as_json.out + as_json.err)
    _warned(as_json.err)
    rows_json = {row["device"]: row for row in json.loads(as_json.out)}
    assert {"good-1", "good-2", "bad-esc", "bad-time"} == set(rows_json)  # members of yard
    assert rows_json["good-2"]["fps"] == 9.5 and rows_json["good-2"]["groups"] == ["yard"]
    esc = rows_json["bad-esc"]
    assert esc["agent_version"] == "\\x1b[2J\\x1b]0;owned\\x07"
    assert esc["last_error"].startswith("\\x1b[2J") and len(esc["last_error"]) == 1001
    assert len(esc["update"]["reason"]) == 1001


def test_status_reports_the_model_across_the_good_devices_despite_hostile_ones(
    fleet: Mosquitto,
) -> None:
    run = run_fleet("status", "--broker", fleet.url, "--model", MODEL)
    assert run.code == 0, run.err
    _clean(run.out + run.err)
    _warned(run.err)
    assert "good-1" in run.out and "good-2" in run.out
    assert "desired: device bad-time -> v1 (issued 1e+300)" in run.out
    assert "refused v\\x1b[2J" in run.out  # the device's text, escaped

    as_json = run_fleet("status", "--broker", fleet.url, "--model", MODEL, "--json")
    assert as_json.code == 0, as_json.err
    _clean(as_json.out + as_json.err)
    status = json.loads(as_json.out)
    assert {"good-1", "good-2"} <= set(status["versions"]["1"])


def test_a_rollout_over_the_group_succeeds_beside_hostile_devices(lab: Lab) -> None:  # noqa: F811
    lab.publish(1, channels=("stable",))
    lab.publish(2)
    agent = lab.agent("dev-a").start()
    wait_alive(lambda: lab.states().get("dev-a", {}).get("version") == 1, 30, "v1", agent)
    hostile = {**HOSTILE, "bad-esc": {**HOSTILE["bad-esc"]}}
    hostile["bad-esc"]["status"] = {"ts": NOW, "state": "online", "groups": ["yard", {"x": ESC}]}
    _leave(lab.broker, hostile)
    run = lab.rollout(2, "--timeout", "60")
    assert run.code == 0, run.out + run.err
    _clean(run.out + run.err)
    _warned(run.err)
    assert "1 device(s) in 1 step(s)" in run.out and "succeeded, 1 device(s) run it" in run.out
    assert lab.devices()["dev-a"]["version"] == 2
