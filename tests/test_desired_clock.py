"""Names and clocks (issue 14, class 8), without a broker: group names are checked like
device ids, a desired state issued too far ahead of the device's clock is refused, and
the fleet tools refuse to make one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.config import parse_config
from agent.desired import Desired, DesiredState, check_clock
from agent.errors import ConfigError
from agent.fleet.deploy import desired_payload

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("groups", "bad"),
    [
        ('[door, "a#b"]', "device.groups[1]: group name 'a#b'"),
        ('["+"]', "device.groups[0]: group name '+'"),
        ('[ok, "x/y"]', "device.groups[1]: group name 'x/y'"),
        ('["two words"]', "device.groups[0]: group name 'two words'"),
        ('[".hidden"]', "device.groups[0]: group name '.hidden'"),
    ],
)
def test_config_refuses_a_group_name_that_is_not_a_topic_level(groups: str, bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"device:\n  id: d1\n  groups: {groups}\n")
    (problem,) = caught.value.problems
    assert problem.startswith(f"config.yaml:3: {bad} is not valid"), problem
    assert "use letters, digits" in problem


def test_config_takes_plain_group_names_and_the_environment_is_checked_too() -> None:
    config = parse_config("device:\n  groups: [door, canary-1, lab_2.x]\n")
    assert config.device.groups == ["door", "canary-1", "lab_2.x"]
    with pytest.raises(ConfigError) as caught:
        parse_config("", env={"EDGE_AGENT_DEVICE_GROUPS": "[door, 'a/#']"})
    assert caught.value.problems[0].startswith(
        "EDGE_AGENT_DEVICE_GROUPS: device.groups[1]: group name 'a/#'"
    )


def test_max_clock_skew_defaults_to_five_minutes_and_must_be_positive() -> None:
    assert parse_config("").update.max_clock_skew_s == 300
    with pytest.raises(ConfigError, match=r"update\.max_clock_skew_s"):
        parse_config("update:\n  max_clock_skew_s: 0\n")


def _desired(issued_at: float) -> Desired:
    return Desired("colours", 2, issued_at, "device")


@pytest.mark.parametrize(
    ("ahead_s", "skew_s", "refused"),
    [
        (-86_400, 300, False),  # issued yesterday
        (0, 300, False),
        (299.9, 300, False),
        (300, 300, False),  # the bound itself is allowed
        (300.1, 300, True),
        (10, 5, True),
        (3 * 365 * 86_400, 300, True),
    ],
)
def test_check_clock_refuses_only_beyond_the_skew(
    ahead_s: float, skew_s: float, refused: bool
) -> None:
    if not refused:
        check_clock(_desired(NOW + ahead_s), NOW, skew_s)
        return
    with pytest.raises(ValueError) as caught:
        check_clock(_desired(NOW + ahead_s), NOW, skew_s)
    text = str(caught.value)
    assert text.startswith(f"issued_at: {NOW + ahead_s:.15g} (")
    assert "this device's clock (1800000000, 2027-01-15T08:00:00Z)" in text
    assert "update.max_clock_skew_s" in text


def test_check_clock_names_a_time_no_calendar_holds() -> None:
    with pytest.raises(ValueError) as caught:
        check_clock(_desired(1e300), NOW, 300)
    assert str(caught.value).startswith("issued_at: 1e+300 (1e+300) is 1e+300 s ahead"), caught
    assert len(str(caught.value)) < 400


def _payload(issued_at: float, version: int = 2) -> bytes:
    doc: dict[str, Any] = {"model": "colours", "version": version, "issued_at": issued_at}
    return json.dumps(doc).encode()


def test_a_future_dated_desired_state_is_refused_and_changes_nothing() -> None:
    state = DesiredState("edge", "d1", ["lab"], max_skew_s=300, clock=lambda: NOW)
    topic, group = "edge/d1/desired", "edge/groups/lab/desired"
    assert state.update(topic, _payload(NOW - 10, 1)) is not None
    with pytest.raises(ValueError, match="ahead of this device's clock"):
        state.update(topic, _payload(NOW + 3600))
    # A refused message changes nothing: the earlier instruction stays in force.
    assert state.winner() == Desired("colours", 1, NOW - 10, "device")
    # Later, a correct one is taken; group states are checked the same way.
    assert state.update(topic, _payload(NOW + 5)) == Desired("colours", 2, NOW + 5, "device")
    with pytest.raises(ValueError, match="ahead of this device's clock"):
        state.update(group, _payload(NOW + 301))
    # Without a bound (the fleet side parsing what it reads), nothing is refused.
    assert DesiredState("edge", "d1", []).update(topic, _payload(NOW + 1e6)) is not None


def test_deploy_refuses_to_make_a_future_dated_desired_state() -> None:
    with pytest.raises(ValueError, match="in the future"):
        desired_payload("colours", 2, "device:d1", 4_000_000_000.0)
    with pytest.raises(ValueError, match="in the future"):
        desired_payload("colours", 2, "device:d1", float("nan"))
    import time

    doc = json.loads(desired_payload("colours", 2, "device:d1", time.time()))
    assert doc["version"] == 2
