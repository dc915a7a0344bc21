"""``edge-agent reload`` (the unit's ExecReload) reports what the agent made of the config.

The rules (tickets, the report, the wait) as table tests; then a real agent subprocess
on a ``file://`` registry, reloaded by the real command line through its control
socket: a new config runs (exit 0), an unchanged one is said so (0), an invalid one is
refused (78) while the agent keeps serving, and with no agent the command says so (1).
A valid config that fails to start (exit 1) is covered by the rules only: nothing found
here passes the checks and then fails to start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.control import ask
from agent.reloading import EXIT_CODES, Done, ReloadError, Reloads, served, wait_for
from tests.agentproc import AgentProcess, wait_alive

DEV = "dev-r"


# -- the rules ----------------------------------------------------------------------------


def test_one_reload_serves_every_ticket_asked_before_it() -> None:
    reloads = Reloads()
    assert reloads.due() is None and reloads.report()["done"] == 0
    first, second = reloads.request(), reloads.request()
    assert (first, second) == (1, 2) and reloads.due() == 2
    reloads.finish(2, "reloaded")
    assert reloads.due() is None
    third = reloads.request()  # asked while nothing runs: served by the next reload
    assert reloads.due() == third == 3
    report = reloads.report()
    assert report["requested"] == 3 and report["done"] == 2 and report["outcome"] == "reloaded"


@pytest.mark.parametrize(
    ("report", "ticket", "expected"),
    [
        ({"done": 0, "outcome": None, "error": None}, 1, None),
        ({"done": 1, "outcome": "reloaded", "error": None}, 1, ("reloaded", None)),
        ({"done": 4, "outcome": "rejected", "error": "x: bad"}, 2, ("rejected", "x: bad")),
        ({"done": 3, "outcome": "unchanged", "error": None, "at": 5.0}, 3, ("unchanged", None)),
    ],
)
def test_served_reads_the_agents_report(
    report: dict[str, Any], ticket: int, expected: tuple[str, str | None] | None
) -> None:
    done = served(report, ticket)
    assert (None if done is None else (done.outcome, done.error)) == expected


@pytest.mark.parametrize(
    ("report", "named"),
    [
        (None, "no reload report"),
        ("done", "no reload report"),
        ({"done": "1", "outcome": "reloaded"}, "done"),
        ({"done": True, "outcome": "reloaded"}, "done"),
        ({"done": 2, "outcome": "maybe"}, "outcome 'maybe'"),
        ({"done": 2, "outcome": "rejected", "error": 7}, "error"),
    ],
)
def test_a_report_that_is_not_one_is_an_error_naming_the_field(report: Any, named: str) -> None:
    with pytest.raises(ReloadError, match=named):
        served(report, 1)


@pytest.mark.parametrize(
    ("outcome", "code"),
    [("reloaded", 0), ("unchanged", 0), ("rejected", 78), ("failed", 1), ("exiting", 1)],
)
def test_each_outcome_has_its_exit_code(outcome: str, code: int) -> None:
    assert EXIT_CODES[outcome] == code  # type: ignore[index]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_for_rides_out_an_agent_that_does_not_answer_while_it_restarts_its_parts() -> None:
    replies: list[dict[str, Any] | None] = [
        {"reload": {"done": 0, "outcome": None}},  # not yet
        None,  # the socket is down while the old service stops
        None,
        {"reload": {"done": 1, "outcome": "reloaded", "error": None, "at": 1.0}},
    ]
    clock = _Clock()
    done = wait_for(lambda: replies.pop(0), 1, 10, clock=clock, sleep=clock.sleep)
    assert done == Done(1, "reloaded", None, 1.0) and not replies


def test_wait_for_gives_up_at_its_deadline() -> None:
    clock = _Clock()
    asked = []

    def status() -> None:
        asked.append(clock.now)

    with pytest.raises(ReloadError, match="within 2 s"):
        wait_for(status, 1, 2.0, poll_s=0.5, clock=clock, sleep=clock.sleep)
    assert len(asked) == 5 and clock.now == 2.0


# -- a real agent, the real command line ------------------------------------------------


def _agent(tmp_path: Path, registry: Path, agents: list[AgentProcess]) -> AgentProcess:
    settings: dict[str, Any] = {"registry": {"url": registry.as_uri(), "poll_interval_s": 3600}}
    agent = AgentProcess(tmp_path / DEV, DEV, settings)
    agents.append(agent)
    return agent


def _cli(
    agent: AgentProcess, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=120,
    )


def _served(agent: AgentProcess) -> dict[str, Any]:
    done = _cli(agent, "status", "--json")
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)["daemon"]["status"] or {}
    return status


def _serving_v1(agent: AgentProcess) -> bool:
    return ((_served(agent).get("stats") or {}).get("version")) == 1


def test_reload_applies_a_new_config_and_says_when_nothing_changed(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, registry, agents).start()
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving", agent)
    pid = _served(agent)["pid"]

    unchanged = _cli(agent, "reload")
    assert unchanged.returncode == 0, unchanged.stderr
    assert "unchanged" in unchanged.stdout

    agent.rewrite(results={"top_k": 2})
    reloaded = _cli(agent, "reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    assert json.loads(reloaded.stdout)["outcome"] == "reloaded"
    status = _served(agent)  # answered at once: the reload was done when reload returned
    assert status["pid"] == pid and status["reload"]["outcome"] == "reloaded"
    assert status["reload"]["done"] == status["reload"]["requested"] == 2
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving again", agent)


def test_an_invalid_config_fails_the_reload_with_78_and_the_agent_keeps_serving(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, registry, agents).start()
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving", agent)
    good = agent.config_path.read_text()

    agent.rewrite(update={"probation_s": "nope"})
    refused = _cli(agent, "reload")
    assert refused.returncode == 78, refused.stderr
    assert "update.probation_s" in refused.stderr and "Traceback" not in refused.stderr

    agent.config_path.write_text(good)
    assert agent.alive()
    assert _served(agent)["reload"]["requested"] == 0  # refused here; the agent not bothered
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving after the refusals", agent)


def test_under_systemd_an_unreadable_config_still_reaches_the_agent_by_sighup(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    """ExecReload gets $MAINPID: a file too broken to find the control socket in is
    refused by the command and still reported by the agent (config_rejected)."""
    agent = _agent(tmp_path, registry, agents).start()
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving", agent)
    good = agent.config_path.read_text()
    socket = load_config(agent.config_path).control_socket
    assert agent.proc is not None
    agent.config_path.write_text("device: [unclosed\n")
    refused = _cli(agent, "reload", env={"MAINPID": str(agent.proc.pid)})
    assert refused.returncode == 78, refused.stderr
    assert "not valid YAML" in refused.stderr and "Traceback" not in refused.stderr
    wait_alive(lambda: ask(socket, "status")["reload"]["done"] == 1, 30, "its reload", agent)
    report = ask(socket, "status")["reload"]
    assert report["outcome"] == "rejected" and str(agent.config_path) in report["error"]
    agent.config_path.write_text(good)
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving after the refusal", agent)


def test_reload_with_no_agent_running_says_so(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, registry, agents)
    done = _cli(agent, "reload")
    assert done.returncode == 1
    assert "no agent answers at" in done.stderr and "systemctl status" in done.stderr


def test_sighup_is_still_a_reload_and_shows_in_the_report(
    tmp_path: Path, registry: Path, agents: list[AgentProcess]
) -> None:
    agent = _agent(tmp_path, registry, agents).start()
    wait_alive(lambda: _serving_v1(agent), 60, "v1 serving", agent)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_alive(lambda: _served(agent)["reload"]["done"] == 1, 30, "the SIGHUP reload", agent)
    assert _served(agent)["reload"]["outcome"] == "unchanged"
