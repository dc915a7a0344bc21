"""The device page's command buttons (/ui/devices/{id}/commands/{name}): in headless
Chromium against a real agent, a real mosquitto, the real ingester and the app on a
real uvicorn (an operator clicks Ping and reads the pong line, Logs and reads the
agent's lines in the pre block, Diagnostics and reads its version, store and config; a
viewer has no buttons); over HTTP the refusals (a viewer's POST and a missing CSRF
field 403 and nothing sent, an offline device 409, a silent one 504, a bad version or
lines 422) and their audit rows, and a device's hostile log lines shown escaped;
tables for the form, the one-line summary and the reply views. Screenshots:
screenshots/."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.server.api.commands import CommandProblem, CommandRequest
from agent.server.web import commands_page, replies
from tests.agentproc import AgentProcess, Tap
from tests.broker import Mosquitto
from tests.browser import Browser, browser, text_of
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
        ("logs", {"lines": ""}, CommandRequest("logs")),
        ("logs", {"lines": " 250 ", "version": "3"}, CommandRequest("logs", {"lines": 250})),
        ("logs", {"lines": "0"}, "lines: must be an integer from 1 to 500"),
        ("logs", {"lines": "501"}, "lines: must be an integer from 1 to 500"),
        ("logs", {"lines": "-5"}, "lines: '-5' is not an integer from 1 to 500"),
        ("logs", {"lines": "9" * 11}, "is not an integer from 1 to 500"),
        ("diagnostics", {"lines": "5"}, CommandRequest("diagnostics")),  # not its field
        ("reboot", {}, "unknown command 'reboot'; known: ping, rollback, check-updates, logs"),
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
        (_out("logs", True, result={"lines": ["a"], "count": 1, "truncated": False}),
         "logs: the last 1 lines"),
        (_out("logs", True, result={"count": 15, "truncated": True}),
         "logs: the last 15 lines (older ones left out: 64 KiB at most)"),
        (_out("logs", True, result={"count": "many"}), "logs: the last ? lines"),
        (_out("logs", False, error="lines: must be an integer from 1 to 500"),
         "logs refused: lines: must be an integer from 1 to 500"),
        (_out("diagnostics", True, result={"versions": {"agent": "1.4.0"}}),
         "diagnostics: agent 1.4.0"),
        (_out("diagnostics", True, result={"versions": ["1.4.0"]}), "diagnostics: agent ?"),
    ],
)  # fmt: skip
def test_summary_is_one_line(out: dict[str, Any], line: str) -> None:
    assert commands_page.summary(out) == line


DIAGNOSTICS = {
    "versions": {"agent": "1.4.0", "python": "3.11.2", "libedgetpu": None},
    "config": {"device": {"id": "dev-a"}, "mqtt": {"password": "***"}},
    "store": {
        "dir": "/var/lib/edge",
        "model": "colours",
        "active": 2,
        "previous": 1,
        "releases": [
            {"version": 1, "task": "classification", "bytes": 2048, "files": [{}], "active": False},
            {
                "version": 2,
                "task": "classification",
                "bytes": 4096,
                "files": [{}, {}],
                "active": True,
            },
            {"version": 3, "error": "manifest: not JSON"},
            "odd",
        ],
    },
    "inference": None,
    "outbox": {"depth": 3, "bytes": 1200},
    "mqtt": {"connected": True, "protocol": "5"},
}


def test_reply_views_show_what_the_device_sent_and_survive_odd_shapes() -> None:
    logs = replies.shown(
        _out("logs", True, result={"lines": ["a", 3, "<b>c</b>"], "truncated": True})
    )
    assert logs == {"logs": replies.LogsView("a\n<b>c</b>", 2, True)}
    view = replies.shown(_out("diagnostics", True, result=DIAGNOSTICS))["diagnostics"]
    assert isinstance(view, replies.DiagnosticsView)
    assert view.versions == [("agent", "1.4.0"), ("python", "3.11.2"), ("libedgetpu", "—")]
    assert view.store == [
        ("dir", "/var/lib/edge"),
        ("model", "colours"),
        ("active", "2"),
        ("previous", "1"),
    ]
    assert view.releases == [
        ("v1", "classification, 2.0 KiB, 1 file"),
        ("v2", "classification, 4.0 KiB, 2 files, active"),
        ("v3", "manifest: not JSON"),
        ("?", "odd"),
    ]
    assert view.inference == [] and view.outbox == [("depth", "3"), ("bytes", "1200")]
    assert view.mqtt == [("connected", "yes"), ("protocol", "5")]
    assert json.loads(view.config) == DIAGNOSTICS["config"] and "\n  " in view.config
    odd = replies.diagnostics_view({"versions": "x", "store": [1], "config": "y" * 10**6})
    assert odd.versions == odd.store == odd.releases == []
    assert len(odd.config) <= replies.MAX_CONFIG + 10
    assert replies.cell("z" * 1000).endswith("…") and len(replies.cell("z" * 1000)) == 301
    assert replies.cell({"a": [1]}) == '{"a":[1]}' and replies.cell(0.5) == "0.50"
    assert replies.shown(_out("logs", False, error="no")) == {}
    assert replies.shown(_out("ping", True, result={"pong": True})) == {}
    assert replies.shown(_out("logs", True, result="odd")) == {}


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

        lines = chrome.web.find_element("id", "logs-lines")
        assert lines.get_attribute("value") == "100"
        lines.clear()
        lines.send_keys("500")
        chrome.web.find_element("id", "cmd-logs").click()
        shown = chrome.wait_id("log-lines")  # only on the new page: not the ping's
        assert text_of(chrome.web, "id", "done").startswith("logs: the last ")
        assert shown.tag_name == "pre"
        assert "ready: " in shown.text, shown.text[-2000:]
        assert chrome.web.current_url == f"{site.url}/ui/devices/dev-a/commands/logs"
        chrome.shot("device-commands-logs")

        chrome.web.find_element("id", "cmd-diagnostics").click()
        versions = chrome.wait_id("diag-versions").text  # only on the new page
        done = text_of(chrome.web, "id", "done")
        assert done == f"diagnostics: agent {__version__}"
        assert "agent" in versions and __version__ in versions
        assert "colours" in text_of(chrome.web, "id", "diag-store")
        assert "active" in text_of(chrome.web, "id", "diag-releases")
        config = json.loads(text_of(chrome.web, "id", "diag-config"))
        assert config["device"]["id"] == "dev-a"
        assert chrome.web.find_elements("id", "log-lines") == []  # one reply at a time
        chrome.shot("device-commands-diagnostics")
        assert [(a[2], a[3]["name"]) for a in site.audit()] == [
            ("ok", "ping"),
            ("ok", "logs"),
            ("ok", "diagnostics"),
        ]

        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, site.viewer)
        chrome.open("/ui/devices/dev-a")
        assert text_of(chrome.web, "id", "device-id") == "dev-a"
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
            for name in ("logs", "diagnostics"):
                status, _, page = viewer.request(
                    "POST", f"/ui/devices/ghost/commands/{name}", {"csrf": csrf, "lines": "5"}
                )
                assert status == 403 and "Only an operator" in page
            assert 'id="cmd-logs"' not in viewer.request("GET", "/ui/devices/ghost")[2]

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
                "POST", "/ui/devices/ghost/commands/logs", {"csrf": csrf, "lines": "501"}
            )
            assert status == 422 and "lines: must be an integer from 1 to 500" in page
            assert 'id="cmd-logs"' in page and 'id="cmd-diagnostics"' in page
            status, _, page = operator.request(
                "POST", "/ui/devices/nobody/commands/ping", {"csrf": csrf}
            )
            assert status == 404
            time.sleep(0.3)
            assert tap.messages == []  # nothing published for any of them

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
                ("device:ghost", "invalid"),
                ("device:nobody", "invalid"),
                ("device:ghost", "timeout"),
            ]
    finally:
        tap.close()


class Hostile(Tap):
    """A device ``ghost`` whose logs and diagnostics carry markup and escape sequences."""

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(client, userdata, msg)
        request_id = json.loads(msg.payload)["id"]
        if msg.topic.endswith("/cmd/logs"):
            lines = ["<script>alert(1)</script>", "\x1b[31mred</pre><b>bold</b>", 42]
            result: dict[str, Any] = {"lines": lines, "count": 3, "truncated": False}
        else:
            result = {**DIAGNOSTICS, "config": {"note": "</pre><img src=x onerror=alert(1)>"}}
        reply = {"command": msg.topic.rsplit("/", 1)[1], "ok": True, "request_id": request_id}
        client.publish("edge/ghost/reply", json.dumps({**reply, "result": result}), qos=1)


def test_a_devices_log_lines_and_config_are_shown_escaped(
    broker: Mosquitto, sqlite_url: str
) -> None:
    device = Hostile("127.0.0.1", broker.port, ["edge/ghost/cmd/#"])
    try:
        with fleet(broker, sqlite_url) as site:
            seed(site.engine, "ghost", online=True)
            operator = Client(site.url)
            operator.login(site.operator)
            csrf = operator.csrf("/ui/devices/ghost")
            status, _, page = operator.request(
                "POST", "/ui/devices/ghost/commands/logs", {"csrf": csrf, "lines": "3"}
            )
            assert " style=" not in page and "<style" not in page  # CSP: none inline
            assert status == 200 and "logs: the last 3 lines" in page
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
            assert "\\x1b[31mred&lt;/pre&gt;&lt;b&gt;bold&lt;/b&gt;" in page  # printable
            assert "\x1b" not in page and "<b>bold" not in page
            status, _, page = operator.request(
                "POST", "/ui/devices/ghost/commands/diagnostics", {"csrf": csrf}
            )
            assert status == 200 and "diagnostics: agent 1.4.0" in page
            assert "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in page
            assert "<img" not in page
            assert " style=" not in page and "<style" not in page
            assert 'id="diag-releases"' in page and "4.0 KiB, 2 files, active" in page
    finally:
        device.close()
