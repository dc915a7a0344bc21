"""The dashboard end to end, with real processes only: headless Chromium against a real
``edge-fleet serve`` subprocess (tokens from ``edge-fleet token``), a real mosquitto and
real agents (``edge-agent run``, a synthetic source) pulling from an HTTP registry that
the real ``publish`` filled with v1 and v2; desired states signed by ``--sign-key``.

One story, in order: an operator has the overview open when four agents start (three
in group ``lobby``, one in ``hall``) and watches them appear; opens a device page (its
charts and events); starts a rollout of v2 to ``lobby`` from the form on /ui/rollouts and
follows its page until it has succeeded; sees ``lobby`` on v2 and ``hall`` still on v1 on
the overview. A viewer then sees every page with no form but logout, and a viewer's
POSTs are refused (403) and change nothing; an agent stopped with SIGTERM and one killed
with SIGKILL (the broker's will) go offline on the viewer's overview.

Every wait is ``tests.browser.wait_for`` (bounded; it reloads the page between looks until
the pages update themselves). Screenshots: screenshots/e2e-*.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.publish import publish
from agent.verify import generate_keypair
from tests.agentproc import MODEL, AgentProcess, publish_models
from tests.broker import Mosquitto
from tests.browser import Browser, browser, text_of, wait_for
from tests.conftest import Models
from tests.registry_server import RegistryServer
from tests.test_dashboard import Client, log_in
from tests.test_server_serve import new_token, serving

GROUP = "lobby"
LOBBY = ("lobby-1", "lobby-2", "lobby-3")
HALL = "hall-1"  # another group: the rollout leaves it on v1
START_S = 30.0
APPEAR_S = 60.0
ROLLOUT_S = 60.0
RELOAD = False  # the pages update themselves (/ui/live): wait without reloading
OFFLINE_S = 20.0  # the will: 1.5 × keepalive_s 5


@pytest.fixture
def registry_server(tmp_path: Path, models: Models) -> Iterator[RegistryServer]:
    """v1 on channel stable (what the agents start on); v2 on no channel (it reaches a
    device only through a desired state)."""
    registry = tmp_path / "registry"
    publish_models(registry, models.root, (1,))
    publish(
        [models.root / "v2.tflite"], model=MODEL, version=2, registry=registry,
        task="classification", labels=models.labels,
    )  # fmt: skip
    with RegistryServer(registry) as server:
        yield server


def _agent(
    root: Path, device: str, group: str, broker: Mosquitto, registry: str, pub: Path
) -> AgentProcess:
    settings = {
        "device": {"id": device, "groups": [group]},
        "registry": {"url": registry, "poll_interval_s": 3600},
        "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 5},
        "results": {"publish": "interval", "interval_s": 1},
        "telemetry": {"interval_s": 1},
        "update": {"probation_s": 1, "budget_runs": 5, "desired_public_key": str(pub)},
    }
    return AgentProcess(root / device, device, settings).start()


# -- reading the pages -------------------------------------------------------------------


def _text(web: Any, element_id: str) -> str:
    return text_of(web, "id", element_id)  # a live page swaps its parts: read again


def _row(web: Any, device: str) -> str:
    """The overview's table row of ``device`` (its text)."""
    return text_of(web, "xpath", f"//table[@id='devices']//tr[td/a[text()='{device}']]")


def _rows(web: Any, devices: tuple[str, ...], *words: str) -> bool:
    return all(all(word in _row(web, d) for word in words) for d in devices)


def _line_points(web: Any, chart: str) -> int:
    """How many points the line of the chart ``chart`` (its id without ``chart-``) has."""
    line = web.find_elements("css selector", f"#chart-{chart} svg polyline")
    return len((line[0].get_attribute("points") or "").split()) if line else 0


def _only_logout(chrome: Browser) -> None:
    """The page has no form but logout's, no button but its, no #actions card."""
    web = chrome.web
    forms = [f.get_attribute("action") for f in web.find_elements("tag name", "form")]
    assert forms == [f"{chrome.base}/ui/logout"], (web.current_url, forms)
    buttons = [b.get_attribute("id") for b in web.find_elements("tag name", "button")]
    assert buttons == ["logout"], (web.current_url, buttons)
    assert web.find_elements("id", "actions") == [], web.current_url


def _fill(chrome: Browser, fields: dict[str, str]) -> None:
    for name, value in fields.items():
        box = chrome.web.find_element("id", name)
        box.clear()
        box.send_keys(value)


def _log_out(chrome: Browser) -> None:
    chrome.web.find_element("id", "logout").click()
    chrome.wait_path("/ui/login")


# -- the story -----------------------------------------------------------------------------


def test_operator_watches_real_agents_appear_update_from_the_page_and_go_offline(
    tmp_path: Path,
    broker: Mosquitto,
    registry_server: RegistryServer,
    agents: list[AgentProcess],
) -> None:
    key, pub = generate_keypair(tmp_path / "keys", "deploy")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    operator = new_token(db, "olga", "operator")
    viewer = new_token(db, "vera", "viewer")
    extra = ("--sign-key", str(key), "--registry", registry_server.url)
    with serving(tmp_path, broker, db, *extra) as serve, browser(1280, 900) as chrome:
        serve.wait_health(200, START_S)
        chrome.base = serve.url

        # the operator has the overview open before any device exists
        log_in(chrome, operator)
        assert _text(chrome.web, "count-total") == "0"
        assert "olga · operator" in _text(chrome.web, "who")
        for device in LOBBY:
            agents.append(_agent(tmp_path, device, GROUP, broker, registry_server.url, pub))
        agents.append(_agent(tmp_path, HALL, "hall", broker, registry_server.url, pub))
        wait_for(
            chrome,
            lambda web: _text(web, "count-online") == "4" and _rows(web, (*LOBBY, HALL), "v1"),
            APPEAR_S,
            what="four agents online on v1",
            reload=RELOAD,
        )
        groups = _text(chrome.web, "by-group")
        assert "lobby 3 0" in groups and "hall 1 0" in groups, groups
        assert "cpu" in _row(chrome.web, LOBBY[0])

        # a device page: identity, its first telemetry, its events; the deploy form
        chrome.web.find_element("link text", LOBBY[0]).click()
        chrome.wait_path(f"/ui/devices/{LOBBY[0]}")
        identity = _text(chrome.web, "identity")
        assert "lobby" in identity and f"{MODEL} v1" in identity and "cpu" in identity, identity
        wait_for(
            chrome,
            lambda web: all(
                web.find_elements("css selector", f"#chart-{name} svg")
                for name in ("inference-fps", "inference-latency-ms-p95", "cpu-pct", "mem-pct")
            ),
            20,
            what="the fps, p95, CPU and memory charts",
            reload=True,  # the device view moves with telemetry only every 30 s
        )
        assert "agent_started" in _text(chrome.web, "events")
        assert chrome.web.find_elements("id", "deploy-form")  # an operator may act

        # a rollout of v2 to the group, started from the page
        chrome.web.find_element("id", "nav-rollouts").click()
        chrome.wait_path("/ui/rollouts")
        form = {"group": GROUP, "model": MODEL, "version": "2", "canary_pct": "33",
                "step_pct": "100", "timeout_s": "30"}  # fmt: skip
        _fill(chrome, form)
        chrome.web.find_element("id", "start-rollout").click()
        chrome.web.switch_to.alert.accept()  # app.js asks before an action
        chrome.wait_id("done")
        rollout_id = _text(chrome.web, "rollout-id")
        assert len(chrome.web.find_elements("css selector", "section.step")) == 2  # canary, rest
        wait_for(
            chrome,
            lambda web: _text(web, "rollout-status") in ("succeeded", "halted", "aborted"),
            ROLLOUT_S,
            what=f"rollout {rollout_id} finished",
            reload=RELOAD,
        )
        assert _text(chrome.web, "rollout-status") == "succeeded", _text(chrome.web, "summary")
        assert _text(chrome.web, "count-succeeded") == "3"
        for device in LOBBY:
            assert "succeeded" in _text(chrome.web, f"member-{device}")
        assert chrome.web.find_elements("id", "actions") == []  # nothing left to do
        chrome.shot("e2e-rollout")

        # the overview: lobby on v2, hall still on v1
        chrome.web.find_element("link text", "Overview").click()
        wait_for(
            chrome,
            lambda web: (
                _rows(web, LOBBY, f"{MODEL} v2", "online") and _rows(web, (HALL,), f"{MODEL} v1")
            ),
            20,
            what="lobby on v2 and hall on v1",
            reload=RELOAD,
        )
        assert _text(chrome.web, "count-updating") == "0"

        # the device page again: its update to v2 in the history, lines in its charts
        chrome.open(f"/ui/devices/{LOBBY[0]}")
        wait_for(
            chrome,
            lambda web: (
                _line_points(web, "inference-fps") >= 2 and _line_points(web, "cpu-pct") >= 2
            ),
            40,
            what="two points or more in the fps and CPU charts",
            reload=True,  # as above
        )
        assert f"{MODEL} v2" in _text(chrome.web, "identity")
        assert _text(chrome.web, "update").startswith(f"{MODEL} v2: succeeded")  # not its phase
        assert rollout_id in _text(chrome.web, "deploys")
        updates = _text(chrome.web, "update-events")
        assert "update_succeeded" in updates and f"{MODEL} v2" in updates, updates
        chrome.shot("e2e-device")
        _log_out(chrome)

        # a viewer: every page, no form but logout
        log_in(chrome, viewer)
        assert "vera · viewer" in _text(chrome.web, "who")
        assert _text(chrome.web, "count-online") == "4"
        _only_logout(chrome)
        chrome.viewport(1280, 900)
        chrome.shot("e2e-overview")  # the README's: four devices, two versions, two groups
        for path in (f"/ui/devices/{LOBBY[0]}", "/ui/releases", "/ui/rollouts",
                     f"/ui/rollouts/{rollout_id}"):  # fmt: skip
            chrome.open(path)
            chrome.wait_path(path)
            _only_logout(chrome)
        chrome.open("/ui/releases")
        running = chrome.web.find_element("css selector", f"#release-{MODEL}-2 .running").text
        assert running.startswith("3") and all(d in running for d in LOBBY), running

        # the viewer's POSTs (with the session's CSRF secret) are refused and do nothing
        client = Client(serve.url)
        assert client.login(viewer)[0] == 303
        csrf = client.csrf()
        wanted = {"csrf": csrf, **form, "group": "hall"}
        assert client.request("POST", "/ui/rollouts", wanted)[0] == 403
        deploy = {"csrf": csrf, "model": MODEL, "version": "2"}
        assert client.request("POST", f"/ui/devices/{HALL}/deploy", deploy)[0] == 403
        assert client.request("POST", f"/ui/rollouts/{rollout_id}/abort", {"csrf": csrf})[0] == 403
        listed = serve.get("/api/v1/rollouts", viewer).body["rollouts"]
        assert [r["id"] for r in listed] == [rollout_id], listed

        # one agent stops (SIGTERM: it says offline), another dies (SIGKILL: the broker
        # publishes its will after 1.5 keepalives): the viewer's overview shows both
        assert agents[2].terminate() == 0
        agents[3].kill()
        chrome.open("/ui/")
        gone = (LOBBY[2], HALL)
        wait_for(
            chrome,
            lambda web: _text(web, "count-offline") == "2" and _rows(web, gone, "offline"),
            OFFLINE_S,
            what=f"{' and '.join(gone)} offline",
            reload=RELOAD,
        )
        assert _text(chrome.web, "count-online") == "2"
        assert _rows(chrome.web, LOBBY[:2], "online")
        groups = _text(chrome.web, "by-group")
        assert "lobby 2 1" in groups and "hall 0 1" in groups, groups
        chrome.shot("e2e-offline")
        assert "Traceback" not in serve.log()
