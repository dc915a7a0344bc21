"""The fleet server's control paths under attack (a second red-team pass): a device
that reports progress for ever, an operator's deploy into a running rollout, a
rollout of a release the registry does not have, the lease under clock skew, a flood
of bad tokens, and devices inventing model names for /metrics. Real mosquitto, both
databases, real uvicorn, as in tests/test_server_rollouts.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.server import rollstore
from agent.server.rollouts import DEFAULT_MAX_DEVICE_S, Member, Observed, Step, advance, due
from tests.broker import Mosquitto, wait_until
from tests.test_server_rollouts import (
    T0,
    FakeDevice,
    Rig,
    _issuer,
    _rollout,
    _update,
)

# -- a device reporting progress for ever ------------------------------------------------


def test_the_default_bound_is_the_agents_own_deadlines_with_a_margin() -> None:
    # download 1800 + one retry wait 300 + validate 120 + activate 30 + probation 120
    assert DEFAULT_MAX_DEVICE_S == 1.5 * 2370


@pytest.mark.parametrize(
    ("now", "outcome", "take_back"),
    [
        (T0 + 99, "pending", None),  # news every few seconds, under the bound: waits
        (T0 + 100, "failed", "set_back"),  # at the bound: fails, set back like a silent one
    ],
)
def test_news_keeps_a_device_pending_only_until_max_device_s(
    now: float, outcome: str, take_back: str | None
) -> None:
    r = _rollout(timeout_s=10.0, max_device_s=100.0)
    steps = [Step(0, 1, "running", T0)]
    a = Member("a", 0, T0, T0, "pending", "downloading", now - 1, ("colours", 1),
               seen=[1.0, 0, None])  # fmt: skip
    fresh = Observed(_update(T0), True, ("colours", 1), [now, 0, None])  # news just now
    got = advance(r, steps, [a], {"a": fresh}, now, _issuer())
    assert got.members[0].outcome == outcome and got.members[0].take_back == take_back
    if outcome == "failed":
        assert got.members[0].timed_out
        assert got.members[0].reason == "not done 100 s after it was sent (last: downloading)"
        assert got.rollout.status == "halting"
        assert [(p.device, p.version) for p in due(got.rollout, got.members, "edge")] == [("a", 1)]


class Chatty(FakeDevice):
    """A device that, on a desired state, reports the download's progress for ever
    (a new state every 0.1 s, never an outcome): every report is news."""

    def __init__(self, url: str, device: str) -> None:
        self.stop = threading.Event()
        super().__init__(url, device, "ok")

    def _update(self, doc: dict[str, Any]) -> None:
        self.applied = {**{k: doc[k] for k in ("model", "version", "issued_at")},
                        "source": "device"}  # fmt: skip
        base = {"id": "u-chatty", "model": doc["model"], "version": doc["version"],
                "source": "device", "issued_at": doc["issued_at"], "outcome": None,
                "reason": None, "started_at": time.time(), "deadline_s": None,
                "retry": None}  # fmt: skip
        for i in range(600):  # bounded: a minute at most
            if self.stop.wait(0.1):
                return
            self.update = {**base, "phase": "downloading" if i % 2 else "verifying"}
            self.publish_state()

    def close(self) -> None:
        self.stop.set()
        super().close()


@pytest.fixture
def rig(broker: Mosquitto, db_url: str) -> Iterator[Rig]:
    made = Rig(broker, db_url)
    yield made
    made.close()


def test_a_device_reporting_progress_for_ever_fails_at_max_device_s(rig: Rig) -> None:
    rig.devices["d1"] = Chatty(rig.broker.url, "d1")
    rig.wait_members(1)
    with rig.engine.begin() as conn:
        rid = rollstore.create(
            conn, who="ops", group="door", model="colours", version=2, canary_pct=100,
            step_pct=100, timeout_s=1.0, max_device_s=3.0,
            members=["d1"], now=time.time(),
        )  # fmt: skip
    rig.driver()
    # silence is 1 s, yet the device keeps talking: only max_device_s ends it
    assert rig.wait_status(rid, "halted", "succeeded") == "halted"
    (d1,) = rig.rows(rid)[2]
    assert d1.outcome == "failed" and d1.timed_out and d1.take_back == "set_back"
    assert d1.reason is not None and d1.reason.startswith("not done 3 s after it was sent")
    assert d1.seconds is not None and 3.0 <= d1.seconds < 10.0
    device = rig.devices["d1"]
    assert wait_until(lambda: (device.got()[-1] or {}).get("version") == 1, 10.0)
