"""The dashboard's releases and rollouts pages (/ui/releases, /ui/rollouts): in headless
Chromium against the real app on a real uvicorn, with fake devices on a real mosquitto
and the real rollout driver; over plain HTTP for CSRF, roles and the API's refusals;
tables for the pure rules. Screenshots: screenshots/."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.publish import publish
from agent.server import rollstore
from agent.server.app import create_app
from agent.server.auth import create_token
from agent.server.db import open_database
from agent.server.releases import ModelInfo, Releases, VersionInfo
from agent.server.schema import audit, rollout_devices, rollouts
from agent.server.store import upsert_device
from agent.server.web import formats, releases_page, rollouts_page
from agent.server.web.releases_page import Running
from tests.broker import Mosquitto
from tests.browser import Browser, browser, text_of
from tests.conftest import MODEL, Fleet, tflite_bytes
from tests.serverhttp import app_over, running
from tests.test_dashboard import Client, log_in
from tests.test_server_api import NOW, fill_fleet, state, status
from tests.test_server_rollouts import Rig

WAIT_S = 30.0


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    with browser() as it:
        yield it


class Site:
    def __init__(self, url: str, engine: sa.Engine, viewer: str, operator: str) -> None:
        self.url, self.engine, self.viewer, self.operator = url, engine, viewer, operator

    def audit(self) -> list[tuple[str, str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit.c.who, audit.c.action, audit.c.outcome))
            return [tuple(r) for r in rows]  # type: ignore[misc]

    def statuses(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(rollouts.c.status)).scalars())


@contextmanager
def site(db_url: str, registry: str | None = None) -> Iterator[Site]:
    """The app on the fleet of tests/test_server_api.py (dev-a and dev-c in group door)
    with a viewer's and an operator's token; no broker (nothing here publishes)."""
    tokens: list[str] = []

    def prepare(engine: sa.Engine) -> None:
        fill_fleet(engine)
        with engine.begin() as conn:
            tokens.append(create_token(conn, "alice", "viewer", NOW))
            tokens.append(create_token(conn, "olga", "operator", NOW))

    with app_over(db_url, now=NOW, prepare=prepare, registry=registry) as (url, engine, _):
        yield Site(url, engine, *tokens)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


FORM = {"group": "door", "model": "colours", "version": "4", "canary_pct": "50",
        "step_pct": "50", "timeout_s": "60"}  # fmt: skip


# -- in the browser: a rollout from the page against fake devices -------------------------


def _fill(web: Browser, fields: dict[str, str]) -> None:
    for name, value in fields.items():
        box = web.web.find_element("id", name)
        box.clear()
        box.send_keys(value)


def test_an_operator_starts_a_rollout_from_the_page_and_sees_it_finish(
    chrome: Browser, broker: Mosquitto, tmp_path: Path
) -> None:
    rig = Rig(broker, f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        for name in ("d1", "d2", "d3"):
            rig.add(name)
        rig.wait_members(3)
        with rig.engine.begin() as conn:
            token = create_token(conn, "olga", "operator", time.time())
        rig.driver()
        with running(create_app(rig.server())) as url:
            chrome.base = url
            chrome.open("/ui/login")
            chrome.web.delete_all_cookies()
            log_in(chrome, token)
            chrome.web.find_element("id", "nav-rollouts").click()
            chrome.wait_path("/ui/rollouts")
            _fill(chrome, {**FORM, "version": "2", "timeout_s": "30"})
            chrome.shot("rollouts-operator")
            chrome.web.find_element("id", "start-rollout").click()
            chrome.web.switch_to.alert.accept()  # app.js asks before an action
            chrome.wait_id("done")
            rollout_id = text_of(chrome.web, "id", "rollout-id")
            assert chrome.web.current_url == f"{url}/ui/rollouts/{rollout_id}?done=created"
            assert len(chrome.web.find_elements("css selector", "section.step")) == 2
            deadline = time.monotonic() + WAIT_S
            while text_of(chrome.web, "id", "rollout-status") != "succeeded":  # live: no reload
                assert time.monotonic() < deadline, text_of(chrome.web, "id", "summary")
                time.sleep(0.3)
            assert text_of(chrome.web, "id", "count-succeeded") == "3"
            for device in ("d1", "d2", "d3"):
                assert "succeeded" in text_of(chrome.web, "id", f"member-{device}")
            assert chrome.web.find_elements("id", "actions") == []  # nothing left to do
            chrome.shot("rollout-succeeded")
            assert all(d.version == 2 for d in rig.devices.values())
            chrome.web.find_element("link text", "all rollouts").click()
            chrome.wait_path("/ui/rollouts")
            assert rollout_id in text_of(chrome.web, "id", "rollouts")
        with rig.engine.connect() as conn:
            rows = conn.execute(sa.select(audit.c.who, audit.c.action, audit.c.outcome)).all()
        assert ("olga", "rollout.create", "ok") in [tuple(r) for r in rows]
    finally:
        rig.close()


def test_a_viewer_sees_rollouts_and_releases_but_no_forms(chrome: Browser, sqlite_url: str) -> None:
    with site(sqlite_url) as s:
        client = Client(s.url)
        client.login(s.operator)
        client.request("POST", "/ui/rollouts", {**FORM, "csrf": client.csrf("/ui/rollouts")})
        (status,) = s.statuses()
        chrome.base = s.url
        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, s.viewer)
        chrome.open("/ui/rollouts")
        assert "door" in chrome.wait_id("rollouts").text and status == "running"
        assert chrome.web.find_elements("id", "rollout-form") == []
        assert chrome.web.find_elements("tag name", "form") == [
            chrome.web.find_element("id", "logout").find_element("xpath", "..")
        ]  # the logout form alone
        chrome.web.find_element("css selector", "#rollouts a").click()
        chrome.wait_id("rollout-status")
        assert chrome.web.find_elements("id", "actions") == []
        assert "dev-a" in text_of(chrome.web, "id", "step-0") + text_of(chrome.web, "id", "step-1")
        chrome.shot("rollout-viewer")
        chrome.web.set_window_size(390, 844)
        try:
            for path in ("/ui/rollouts", "/ui/releases"):
                chrome.open(path)
                width = chrome.web.execute_script("return document.documentElement.scrollWidth")
                assert width <= 390, path  # readable on a phone: tables scroll themselves
        finally:
            chrome.web.set_window_size(1280, 900)
        chrome.open("/ui/releases")
        assert "--registry" in chrome.wait_id("registry-problem").text
        chrome.shot("releases-no-registry")
        assert "colours v3" in text_of(chrome.web, "id", "unlisted")
        assert len(chrome.web.find_elements("tag name", "form")) == 1


# -- over HTTP: CSRF, roles, the API's refusals -----------------------------------------


def test_rollout_posts_without_the_csrf_field_or_from_another_site_are_403(
    sqlite_url: str,
) -> None:
    with site(sqlite_url) as s:
        client = Client(s.url)
        client.login(s.operator)
        for form in (FORM, {**FORM, "csrf": "wrong"}):
            status, _, page = client.request("POST", "/ui/rollouts", form)
            assert status == 403 and "CSRF" in page
        csrf = client.csrf("/ui/rollouts")
        status, _, _ = client.request(
            "POST", "/ui/rollouts", {**FORM, "csrf": csrf}, Origin="https://evil.example"
        )
        assert status == 403 and s.statuses() == []
        status, headers, _ = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf})
        assert status == 303, headers
        rid = headers["location"].split("/")[-1].split("?")[0]
        for form in ({}, {"csrf": "wrong"}):
            status, _, page = client.request("POST", f"/ui/rollouts/{rid}/pause", form)
            assert status == 403 and "CSRF" in page
        status, _, _ = client.request(
            "POST", f"/ui/rollouts/{rid}/abort", {"csrf": csrf}, Origin="null"
        )
        assert status == 403 and s.statuses() == ["running"]


def test_a_viewer_cannot_start_or_stop_a_rollout_even_with_the_csrf_token(
    sqlite_url: str,
) -> None:
    with site(sqlite_url) as s:
        ops = Client(s.url)
        ops.login(s.operator)
        ops.request("POST", "/ui/rollouts", {**FORM, "csrf": ops.csrf("/ui/rollouts")})
        (rid,) = re.findall(
            r'href="/ui/rollouts/([0-9a-f]+)"', ops.request("GET", "/ui/rollouts")[2]
        )
        viewer = Client(s.url)
        viewer.login(s.viewer)
        csrf = viewer.csrf("/ui/rollouts")
        status, _, page = viewer.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf})
        assert status == 403 and "operator" in page
        for action in ("pause", "abort"):
            status, _, page = viewer.request("POST", f"/ui/rollouts/{rid}/{action}", {"csrf": csrf})
            assert status == 403 and "operator" in page
        assert s.statuses() == ["running"]
        assert [a for a in s.audit() if a[0] == "alice" and a[1] != "ui.login"] == []


def test_the_form_runs_the_apis_checks_and_moves_and_each_is_audited(sqlite_url: str) -> None:
    with site(sqlite_url) as s:
        client = Client(s.url)
        client.login(s.operator)
        csrf = client.csrf("/ui/rollouts")
        status, _, page = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf,
                                                                  "version": "x"})  # fmt: skip
        assert status == 422 and "version: &#39;x&#39; is not a positive integer" in page
        assert 'value="door"' in page  # the form keeps what was typed
        status, _, page = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf,
                                                                  "canary_pct": "150"})  # fmt: skip
        assert status == 422 and "canary_pct" in page
        status, _, page = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf,
                                                                  "group": "nowhere"})  # fmt: skip
        assert status == 409 and "no device reports group" in page
        status, headers, _ = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf})
        assert status == 303
        rid = headers["location"].split("/")[-1].split("?")[0]
        status, _, page = client.request("POST", "/ui/rollouts", {**FORM, "csrf": csrf})
        assert status == 409 and rid in page  # one at a time per group
        status, _, page = client.request("GET", f"/ui/rollouts/{rid}")
        assert status == 200 and 'id="pause"' in page and 'id="resume"' not in page
        status, headers, _ = client.request("POST", f"/ui/rollouts/{rid}/pause", {"csrf": csrf})
        assert (status, headers["location"]) == (303, f"/ui/rollouts/{rid}?done=pause")
        assert s.statuses() == ["paused"]
        status, _, page = client.request("POST", f"/ui/rollouts/{rid}/pause", {"csrf": csrf})
        assert status == 409 and "cannot pause" in page and 'id="resume"' in page
        assert client.request("POST", f"/ui/rollouts/{rid}/resume", {"csrf": csrf})[0] == 303
        assert client.request("POST", f"/ui/rollouts/{rid}/abort", {"csrf": csrf})[0] == 303
        assert s.statuses() == ["aborting"]
        assert client.request("POST", f"/ui/rollouts/{rid}/explode", {"csrf": csrf})[0] == 404
        assert client.request("GET", "/ui/rollouts/nope")[0] == 404
        assert client.request("GET", "/ui/rollouts?status=bogus")[0] == 422
        status, _, page = client.request("GET", "/ui/rollouts?status=aborting")
        assert status == 200 and rid in page
        assert rid not in client.request("GET", "/ui/rollouts?status=running")[2]
        olga = [(action, outcome) for who, action, outcome in s.audit() if who == "olga"]
        assert olga == [
            ("ui.login", "ok"),
            ("rollout.create", "invalid"),  # canary_pct (the version never reached the API)
            ("rollout.create", "refused"),  # no device in the group
            ("rollout.create", "ok"),
            ("rollout.create", "refused"),  # the group is busy
            ("rollout.pause", "ok"),
            ("rollout.pause", "refused"),
            ("rollout.resume", "ok"),
            ("rollout.abort", "ok"),
        ]


def test_pages_without_a_session_redirect_to_login(sqlite_url: str) -> None:
    with site(sqlite_url) as s:
        for path in ("/ui/rollouts", "/ui/rollouts/abc", "/ui/releases"):
            status, headers, _ = Client(s.url).request("GET", path)
            assert (status, headers["location"]) == (303, "/ui/login"), path


# -- the releases page ------------------------------------------------------------------


def test_the_releases_page_shows_files_sizes_signatures_and_who_runs_each(
    chrome: Browser, sqlite_url: str, fleet: Fleet
) -> None:
    fleet.release(1, channels=("stable",))
    src = fleet.root / "v2"
    src.mkdir(parents=True)
    (src / "model.tflite").write_bytes(tflite_bytes(300_000, 2))
    publish([src / "model.tflite"], model=MODEL, version=2, registry=fleet.registry,
            task="detection", sign_key=fleet.key, channels=("beta",),
            budget_p95_ms=40.0)  # fmt: skip
    fleet.path(2, "manifest.json.sig").unlink()  # v2's manifest unsigned
    with site(sqlite_url, registry=str(fleet.registry)) as s:
        with s.engine.begin() as conn:
            for n in range(12):
                upsert_device(conn, f"cam-{n:02d}", NOW, state=state(MODEL, 1))
        chrome.base = s.url
        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, s.viewer)
        chrome.web.find_element("id", "nav-releases").click()
        chrome.wait_path("/ui/releases")
        v1 = chrome.web.find_element("id", f"release-{MODEL}-1")
        v2 = chrome.web.find_element("id", f"release-{MODEL}-2")
        assert "detection" in v1.text and "model.tflite" in v1.text and "195.3 KiB" in v1.text
        assert "labels.txt" in v1.text
        assert v1.find_element("class name", "signed").text.startswith("yes")
        assert v2.find_element("class name", "signed").text == "no"
        assert (v1.find_element("class name", "budget").text, v2.find_element(
            "class name", "budget").text) == ("no", "yes")  # fmt: skip
        assert v2.find_element("class name", "selftest").text == "no"
        ran = v1.find_element("class name", "running").text
        assert ran.startswith("12:") and "cam-00" in ran and "cam-09" in ran
        assert "cam-10" not in ran and "and 2 more" in ran
        assert v2.find_element("class name", "running").text == "none"
        assert "colours v3" in text_of(chrome.web, "id", "unlisted")  # not a release
        chrome.shot("releases")


def test_the_releases_page_says_why_without_a_readable_registry(
    sqlite_url: str, tmp_path: Path
) -> None:
    with site(sqlite_url, registry=str(tmp_path / "nowhere")) as s:
        client = Client(s.url)
        client.login(s.viewer)
        status, _, page = client.request("GET", "/ui/releases")
        assert status == 503 and "The registry cannot be read" in page
        assert "colours v2" in page and "colours v3" in page  # the devices' versions still


# -- pure rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        (FORM, ("door", "colours", 4, 50.0, 50.0, 60.0)),
        ({"group": " door ", "model": "colours", "version": "7"},
         ("door", "colours", 7, 10.0, 25.0, 900.0)),  # the defaults
        ({**FORM, "version": "-1"}, "version: '-1' is not a positive integer"),
        ({**FORM, "version": "12345678901"}, "version"),
        ({**FORM, "canary_pct": "ten"}, "canary_pct: 'ten' is not a number"),
        ({**FORM, "step_pct": "nan"}, "step_pct"),
        ({**FORM, "timeout_s": "inf"}, "timeout_s"),
        ({**FORM, "timeout_s": "9" * 40}, "timeout_s"),
    ],
)  # fmt: skip
def test_rollout_request(form: dict[str, str], expected: Any) -> None:
    if isinstance(expected, tuple):
        r = rollouts_page.rollout_request(form)
        assert (r.group, r.model, r.version, r.canary_pct, r.step_pct, r.timeout_s) == expected
    else:
        with pytest.raises(rollouts_page.FormProblems, match=expected):
            rollouts_page.rollout_request(form)


@pytest.mark.parametrize(
    ("status", "buttons"),
    [
        ("running", ["pause", "abort"]),
        ("paused", ["resume", "abort"]),
        ("halting", []),
        ("succeeded", []),
        ("aborted", []),
    ],
)
def test_allowed(status: str, buttons: list[str]) -> None:
    assert rollouts_page.allowed(status) == buttons


def test_tally() -> None:
    def dev(status: str) -> dict[str, Any]:
        return {"status": status}

    shown = {"steps": [{"devices": [dev("succeeded"), dev("failed")]},
                       {"devices": [dev("pending"), dev("untouched"), dev("odd")]}]}  # fmt: skip
    assert rollouts_page.tally(shown) == {
        "succeeded": 1, "failed": 1, "pending": 2, "untouched": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (200_000, "195.3 KiB"), (5 * 2**20, "5.0 MiB"),
     (3 * 2**30, "3.0 GiB"), (None, "—"), (-1, "—"), (True, "—")],
)  # fmt: skip
def test_size(n: Any, text: str) -> None:
    assert formats.size(n) == text


def test_unlisted_are_the_running_releases_the_registry_does_not_show() -> None:
    run = {("a", 1): Running(2, ["x", "y"]), ("a", 9): Running(1, ["z"]), ("b", 1): Running(1)}
    listing = Releases("r", [ModelInfo("a", versions=[VersionInfo(1)])], NOW)
    assert [k for k, _ in releases_page.unlisted(listing, run)] == [("a", 9), ("b", 1)]
    assert [k for k, _ in releases_page.unlisted(None, run)] == [("a", 1), ("a", 9), ("b", 1)]


def test_running_counts_every_device_and_names_the_first_ten(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        with engine.begin() as conn:
            for n in range(13):
                upsert_device(conn, f"cam-{n:02d}", NOW, state=state("colours", 1 + n % 2))
            upsert_device(conn, "bare", NOW, status={"state": "online", "groups": []})
        with engine.connect() as conn:
            run = releases_page.running(conn)
        assert sorted(run) == [("colours", 1), ("colours", 2)]
        assert run[("colours", 1)].count == 7 and run[("colours", 2)].count == 6
        assert run[("colours", 1)].devices == [f"cam-{n:02d}" for n in range(0, 13, 2)]
        big = [f"cam-{n:02d}" for n in range(13)]
        with engine.begin() as conn:
            for n in range(13, 25):
                upsert_device(conn, f"cam-{n:02d}", NOW, state=state("colours", 3))
                big.append(f"cam-{n:02d}")
        with engine.connect() as conn:
            three = releases_page.running(conn)[("colours", 3)]
        assert three.count == 12 and three.devices == big[13:23]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("statuses", "everything", "listed", "hidden"),
    [
        (["succeeded", "failed", "pending"], False, ["succeeded", "failed", "pending"], 0),
        (  # too many: what needs eyes first, each kind in its order
            ["succeeded", "untouched", "failed", "pending", "succeeded"],
            False,
            ["failed", "pending", "untouched"],
            2,
        ),
        (["succeeded"] * 5, True, ["succeeded"] * 5, 0),  # ?all=1
    ],
)
def test_members_shown(
    statuses: list[str], everything: bool, listed: list[str], hidden: int
) -> None:
    devices = [{"device": f"d{i}", "status": s} for i, s in enumerate(statuses)]
    shown, left = rollouts_page.members_shown(devices, everything, limit=3)
    assert [d["status"] for d in shown] == listed and left == hidden


def test_a_rollout_over_many_devices_lists_a_hundred_per_step_problems_first(
    sqlite_url: str,
) -> None:
    with site(sqlite_url) as s:
        with s.engine.begin() as conn:
            for n in range(250):
                upsert_device(conn, f"big-{n:03}", NOW - 5, status=status("online", "big"))
            members = rollstore.members_of(conn, "big")
            made = rollstore.create(conn, who="t", group="big", model="colours", version=2,
                                    canary_pct=10, step_pct=100, timeout_s=60,
                                    members=members, now=NOW)  # fmt: skip
            conn.execute(
                sa.update(rollout_devices)
                .where(rollout_devices.c.rollout_id == made)
                .values(outcome="succeeded")
            )
            conn.execute(
                sa.update(rollout_devices)
                .where(rollout_devices.c.device == "big-249")
                .values(outcome="failed")
            )
        client = Client(s.url)
        client.login(s.viewer)
        code, _, page = client.request("GET", f"/ui/rollouts/{made}")
        assert code == 200
        rows = re.findall(r'<tr id="member-(big-\d+)"', page)
        canary = 25  # 10 % of 250
        assert len(rows) == canary + 100
        assert "big-249" in rows[canary : canary + 1]  # the failed one heads the rest
        assert f"and {250 - canary - 100} more devices" in page
        assert len(page) < 120_000
        code, _, everything = client.request("GET", f"/ui/rollouts/{made}?all=1")
        assert code == 200 and len(re.findall(r'<tr id="member-', everything)) == 250
        assert f'data-live-url="/ui/rollouts/{made}?all=1"' in everything
