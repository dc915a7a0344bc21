"""The device page's command buttons (/ui/devices/{id}/commands/{name}): in headless
Chromium against a real agent, a real mosquitto, the real ingester and the app on a
real uvicorn (an operator clicks Ping and reads the pong line; a viewer has no
buttons); over HTTP the refusals (a viewer's POST and a missing CSRF field 403 and
nothing sent, an offline device 409, a silent one 504, a bad version 422) and their
audit rows; tables for the form and the one-line summary. Screenshots: screenshots/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.server.api.commands import CommandProblem, CommandRequest
from agent.server.web import commands_page
from tests.agentproc import AgentProcess, Tap
from tests.broker import Mosquitto
from tests.browser import Browser, browser
from tests.test_dashboard import Client, log_in
from tests.test_server_commands import fleet, seed, start_agent, wait_version


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    with browser(width=390, height=844) as it:  # a phone's width
        yield it


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# -- tables -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "form", "expected"),
    [
        ("ping", {}, CommandRequest("ping")),
        ("ping", {"version": "3"}, CommandRequest("ping")),  # only rollback reads it
        ("check-updates", {"csrf": "x"}, CommandRequest("check-updates")),
        ("rollback", {"version": " "}, CommandRequest("rollback")),
        ("rollback", {"version": "2"}, CommandRequest("rollback", {"version": 2})),
        ("rollback", {"version": "0"}, "version: '0' is not a positive integer"),
        ("rollback", {"version": "v2"}, "version: 'v2' is not a positive integer"),
        ("rollback", {"version": "9" * 11}, "is not a positive integer"),
        ("reboot", {}, "unknown command 'reboot'; known: ping, rollback, check-updates"),
    ],
)
def test_form_command(name: str, form: dict[str, str], expected: CommandRequest | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(CommandProblem) as caught:
            commands_page.form_command(name, form)
        assert expected in str(caught.value)
    else:
        assert commands_page.form_command(name, form) == expected


PONG = {"pong": True, "uptime_s": 12.4, "model": "colours", "version": 2, "phase": "idle"}


def _out(command: str, ok: bool, **rest: Any) -> dict[str, Any]:
    return {"command": command, "ok": ok, **rest}


@pytest.mark.parametrize(
    ("out", "line"),
    [
        (_out("ping", True, result=PONG), "ping: pong — up 12 s, colours v2, idle"),
        (_out("ping", True, result={"pong": True}), "ping: pong — up ? s, no model, no phase"),
        (_out("rollback", True, result={"version": 1, "from": 2}), "rollback: now v1 (from v2)"),
        (_out("rollback", False, error="no v9"), "rollback refused: no v9"),
        (_out("ping", False), "ping refused: no reason given"),
        (_out("check-updates", True, result={"version": 2, "changed": True}),
         "check-updates: the channel names v2; an update starts"),
        (_out("check-updates", True, result={"version": 2, "changed": False}),
         "check-updates: the channel names v2; nothing to do"),
        (_out("check-updates", True, result={"desired": {}, "note": "pushed"}),
         "check-updates: pushed"),
        (_out("rollback", True, result={"version": True}), "rollback: now ? (from ?)"),
    ],
)  # fmt: skip
def test_summary_is_one_line(out: dict[str, Any], line: str) -> None:
    assert commands_page.summary(out) == line


# -- in the browser, against a real agent -------------------------------------------------


def test_an_operator_pings_a_real_agent_and_a_viewer_has_no_buttons(
    chrome: Browser,
    tmp_path: Path,
    broker: Mosquitto,
    registry: Path,
    agents: list[AgentProcess],
    sqlite_url: str,
) -> None:
    with fleet(broker, sqlite_url) as site:
        agent = start_agent(tmp_path, broker, registry, agents, "dev-a")
        wait_version(site, agent, 1)
        chrome.base = site.url
        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, site.operator)
        chrome.open("/ui/devices/dev-a")
        assert chrome.web.find_element("id", "cmd-rollback").is_displayed()
        assert chrome.web.find_element("id", "cmd-check-updates").is_displayed()
        chrome.web.find_element("id", "cmd-ping").click()  # harmless: no question asked
        line = chrome.wait_id("done").text
        assert line.startswith("ping: pong — up "), line
        assert "colours v1" in line
        assert chrome.web.current_url == f"{site.url}/ui/devices/dev-a/commands/ping"
        chrome.shot("device-commands-operator")
        assert [a[2] for a in site.audit()] == ["ok"]

        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, site.viewer)
        chrome.open("/ui/devices/dev-a")
        assert chrome.web.find_element("id", "device-id").text == "dev-a"
        assert chrome.web.find_elements("id", "commands") == []
        assert chrome.web.find_elements("css selector", "form[action*='/commands/']") == []
        chrome.shot("device-commands-viewer")


# -- over HTTP ----------------------------------------------------------------------------


def test_refusals_on_the_page_keep_the_api_status_and_send_nothing(
    broker: Mosquitto, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = Tap("127.0.0.1", broker.port, ["edge/+/cmd/#"])
    try:
        with fleet(broker, sqlite_url) as site:
            seed(site.engine, "gone", online=False)
            seed(site.engine, "ghost", online=True)
            viewer = Client(site.url)
            viewer.login(site.viewer)
            csrf = viewer.csrf("/ui/devices/ghost")
            status, _, page = viewer.request(
                "POST", "/ui/devices/ghost/commands/ping", {"csrf": csrf}
            )
            assert status == 403 and "Only an operator" in page

            operator = Client(site.url)
            operator.login(site.operator)
            csrf = operator.csrf("/ui/devices/ghost")
            assert 'id="cmd-ping"' in operator.request("GET", "/ui/devices/ghost")[2]
            status, _, _ = operator.request("POST", "/ui/devices/ghost/commands/ping", {})
            assert status == 403  # no CSRF field
            status, _, page = operator.request(
                "POST", "/ui/devices/gone/commands/ping", {"csrf": csrf}
            )
            assert status == 409 and "gone is offline: commands are not queued for it" in page
            status, _, page = operator.request(
                "POST", "/ui/devices/ghost/commands/rollback", {"csrf": csrf, "version": "two"}
            )
            assert status == 422 and "version: &#39;two&#39; is not a positive integer" in page
            status, _, page = operator.request(
                "POST", "/ui/devices/nobody/commands/ping", {"csrf": csrf}
            )
            assert status == 404
            time.sleep(0.3)
            assert tap.docs("/cmd/ping") == [] and tap.docs("/cmd/rollback") == []

            monkeypatch.setattr(commands_page, "WAIT_S", 1.0)  # the page's 10 s, shortened
            status, _, page = operator.request(
                "POST", "/ui/devices/ghost/commands/check-updates", {"csrf": csrf}
            )
            assert status == 504 and "no reply from ghost in 1 s" in page
            assert 'id="action-error"' in page and 'id="device-id">ghost<' in page
            assert len(tap.docs("/ghost/cmd/check-updates")) == 1
            assert [(r[1], r[2]) for r in site.audit()] == [
                ("device:gone", "refused"),
                ("device:ghost", "invalid"),
                ("device:nobody", "invalid"),
                ("device:ghost", "timeout"),
            ]
    finally:
        tap.close()
