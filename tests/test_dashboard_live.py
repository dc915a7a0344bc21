"""Live pages (/ui/live, static/app.js): server-sent events read over real HTTP from the
real app on a real uvicorn (a change stored through agent/server/store.py is announced,
heartbeats, the stream ends with its session, caps); the real ``edge-fleet serve``
stopping promptly on SIGTERM with a stream open; in headless Chromium, pages that follow
the database without reloading (the same ``window``), a rollout run by the real driver
against fake devices on a real mosquitto among them; tables for the pure rules."""

from __future__ import annotations

import http.client
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.server.app import create_app
from agent.server.auth import create_token, revoke_token
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.schema import rollouts
from agent.server.store import upsert_device
from agent.server.web import live
from agent.server.web.live import LiveOptions, View
from agent.server.web.sessions import COOKIE
from tests.broker import Mosquitto
from tests.browser import Browser, browser, text_of
from tests.serverhttp import running
from tests.test_dashboard import Client, log_in
from tests.test_server_api import NOW, fill_fleet, state, status
from tests.test_server_rollouts import Rig
from tests.test_server_serve import new_token, serving

QUICK = LiveOptions(tick_s=0.2, ping_s=1.0, life_s=30.0, retry_ms=500, max_streams=3, per_session=2)
READ_S = 5.0  # a socket read on a stream


# -- a server-sent events reader ----------------------------------------------------------


@dataclass
class Event:
    event: str | None  # None: a comment (the heartbeat)
    data: str = ""
    id: str | None = None


class Sse:
    """One ``GET /ui/live`` over http.client; reads events with bounded socket reads."""

    def __init__(self, base: str, cookie: str | None, view: str, last_id: str | None = None):
        url = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=READ_S)
        headers = {"Accept": "text/event-stream"}
        if cookie is not None:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        self.conn.request("GET", "/ui/live?view=" + urllib.parse.quote(view), headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def next(self) -> Event | None:
        """The next event or comment; None at the end of the stream."""
        fields: dict[str, str] = {}
        comment = False
        while True:
            line = self.response.readline().decode()
            if not line:
                return None
            line = line.rstrip("\n")
            if not line:
                if fields.get("event") or fields.get("data") or comment:
                    return Event(fields.get("event"), fields.get("data", ""), fields.get("id"))
                continue
            if line.startswith(":"):
                comment = True
                continue
            name, _, value = line.partition(": ")
            fields[name] = value

    def wait(self, event: str | None, within: float = 8.0) -> Event:
        deadline = time.monotonic() + within
        seen = []
        while time.monotonic() < deadline:
            got = self.next()
            assert got is not None, f"the stream ended before {event!r}; saw {seen}"
            if got.event == event:
                return got
            seen.append(got)
        raise AssertionError(f"no {event!r} within {within:g} s; saw {seen}")

    def ends(self, within: float = 5.0) -> list[Event]:
        """Everything until the stream ends (bounded)."""
        deadline, seen = time.monotonic() + within, []
        while (got := self.next()) is not None:
            seen.append(got)
            assert time.monotonic() < deadline, f"the stream did not end; saw {seen}"
        return seen

    def close(self) -> None:
        self.conn.close()


@dataclass
class Live:
    url: str
    engine: sa.Engine
    streams: live.Streams
    viewer: str
    operator: str

    def signed_in(self, token: str) -> tuple[Client, str]:
        client = Client(self.url)
        assert client.login(token)[0] == 303
        return client, next(c.value for c in client.jar if c.name == COOKIE and c.value)

    def store(self, device: str, **docs: Any) -> None:
        with self.engine.begin() as conn:
            upsert_device(conn, device, NOW, **docs)


@contextmanager
def live_app(db_url: str, options: LiveOptions = QUICK) -> Iterator[Live]:
    """The app over tests/test_server_api.py's fleet, its streams quick, the clock at NOW."""
    from agent.fleet.broker import BrokerOptions
    from agent.server.ingest import IngestOptions

    engine = open_database(db_url)
    try:
        fill_fleet(engine)
        with engine.begin() as conn:
            tokens = [create_token(conn, n, r, NOW) for n, r in (("alice", "viewer"),
                                                                ("olga", "operator"))]  # fmt: skip
        serve = ServeOptions(db_url, BrokerOptions("mqtt://127.0.0.1:1"), IngestOptions("t"))
        app = create_app(Server(serve, engine, publisher=None, clock=lambda: NOW))  # type: ignore[arg-type]
        app.state.live.options = options
        with running(app) as url:
            yield Live(url, engine, app.state.live, *tokens)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def site(sqlite_url: str) -> Iterator[Live]:
    with live_app(sqlite_url) as it:
        yield it


# -- over HTTP ----------------------------------------------------------------------------


def test_the_stream_announces_a_device_stored_after_it_opened(site: Live) -> None:
    _, cookie = site.signed_in(site.viewer)
    stream = Sse(site.url, cookie, "overview")
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-store"
        assert "default-src 'self'" in stream.headers["content-security-policy"]
        ready = stream.wait("ready")
        assert ready.id and len(ready.id) == 20  # the page's fingerprint: Last-Event-ID
        time.sleep(3 * QUICK.tick_s)  # nothing changed: no event but pings
        site.store("dev-new", status=status("online", "door"))
        changed = stream.wait("changed")
        assert changed.data == "overview" and changed.id != ready.id
        site.store("dev-new", status=status("offline", "door"))  # it goes offline
        assert stream.wait("changed").id not in (ready.id, changed.id)
    finally:
        stream.close()


def test_a_quiet_stream_sends_heartbeats(site: Live) -> None:
    _, cookie = site.signed_in(site.viewer)
    stream = Sse(site.url, cookie, "rollouts")
    try:
        stream.wait("ready")
        started = time.monotonic()
        stream.wait(None, within=3 * QUICK.ping_s)  # ": ping"
        assert time.monotonic() - started >= QUICK.ping_s * 0.5
    finally:
        stream.close()


def test_a_rollout_page_hears_its_moves(site: Live) -> None:
    client, cookie = site.signed_in(site.operator)
    form = {"group": "door", "model": "colours", "version": "4", "canary_pct": "50",
            "step_pct": "50", "timeout_s": "60"}  # fmt: skip
    created = client.request("POST", "/ui/rollouts", {**form, "csrf": client.csrf("/ui/rollouts")})
    assert created[0] == 303, created
    with site.engine.connect() as conn:
        (rollout_id,) = conn.execute(sa.select(rollouts.c.id)).scalars()
    stream = Sse(site.url, cookie, f"rollout:{rollout_id}")
    other = Sse(site.url, cookie, "device:dev-b")  # a device page: not moved by a rollout
    try:
        stream.wait("ready")
        other.wait("ready")
        path = f"/ui/rollouts/{rollout_id}"
        paused = client.request("POST", f"{path}/pause", {"csrf": client.csrf(path)})
        assert paused[0] == 303, paused
        assert stream.wait("changed").data == "rollout"
        site.store("dev-b", state=state("colours", 3))  # dev-b's version changes
        assert other.wait("changed").data == "device"
    finally:
        stream.close()
        other.close()


def test_the_stream_ends_on_logout_and_on_revocation(site: Live) -> None:
    client, cookie = site.signed_in(site.viewer)
    stream = Sse(site.url, cookie, "overview")
    try:
        stream.wait("ready")
        assert client.request("POST", "/ui/logout", {"csrf": client.csrf()})[0] == 303
        assert [(e.event, e.data) for e in stream.ends() if e.event] == [("ended", "signed out")]
    finally:
        stream.close()
    _, cookie = site.signed_in(site.operator)
    stream = Sse(site.url, cookie, "releases")
    try:
        stream.wait("ready")
        with site.engine.begin() as conn:
            assert revoke_token(conn, "olga", NOW)
        assert [e.event for e in stream.ends() if e.event] == ["ended"]
        # every place given back: by the stream's own ending, just after its last event
        deadline = time.monotonic() + 5
        while site.streams.total != 0:
            assert time.monotonic() < deadline, site.streams
            time.sleep(0.05)
    finally:
        stream.close()


def test_no_session_or_a_bad_view_is_refused(site: Live) -> None:
    for cookie in (None, "forged"):
        refused = Sse(site.url, cookie, "overview")
        assert refused.status == 401 and b"/ui/login" in refused.response.read()
        refused.close()
    _, cookie = site.signed_in(site.viewer)
    for view in ("everything", "device:", "device:a/b", "rollout:", "overview:x"):
        bad = Sse(site.url, cookie, view)
        body = bad.response.read().decode()
        assert bad.status == 422 and body.startswith("view:"), (view, body)
        bad.close()


def test_streams_are_capped_per_session_and_server_wide(site: Live) -> None:
    _, alice = site.signed_in(site.viewer)
    _, olga = site.signed_in(site.operator)
    opened = [Sse(site.url, alice, "overview") for _ in range(QUICK.per_session)]
    try:
        third = Sse(site.url, alice, "overview")
        assert third.status == 429 and third.headers["retry-after"] == "30"
        third.close()
        opened.append(Sse(site.url, olga, "overview"))  # the server's third
        assert [s.status for s in opened] == [200, 200, 200]
        beyond = Sse(site.url, olga, "overview")
        assert beyond.status == 503, beyond.response.read()
        beyond.close()
        opened.pop(0).close()  # a browser goes away: its place is given back
        deadline = time.monotonic() + 5
        while site.streams.total >= QUICK.max_streams:
            assert time.monotonic() < deadline, site.streams
            time.sleep(0.05)
        again = Sse(site.url, olga, "overview")
        assert again.status == 200
        opened.append(again)
    finally:
        for s in opened:
            s.close()


def test_a_stream_lives_bounded_and_a_reconnect_hears_what_it_missed(sqlite_url: str) -> None:
    with live_app(sqlite_url, LiveOptions(tick_s=0.2, life_s=1.0)) as site:
        _, cookie = site.signed_in(site.viewer)
        stream = Sse(site.url, cookie, "device:dev-a")
        ready = stream.wait("ready")
        started = time.monotonic()
        assert [e.event for e in stream.ends() if e.event] == []  # closed, no "ended"
        assert 0.8 <= time.monotonic() - started <= 3.0
        stream.close()
        site.store("dev-a", state=state("colours", 4))  # while the browser was away
        back = Sse(site.url, cookie, "device:dev-a", last_id=ready.id)
        try:
            back.wait("ready")
            assert back.wait("changed", within=1.0).data == "device"
        finally:
            back.close()


def test_serve_stops_promptly_on_sigterm_with_a_live_page_open(
    tmp_path: Path, broker: Mosquitto
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    token = new_token(db, "alice", "viewer")
    with serving(tmp_path, broker, db) as serve:
        serve.wait_health(200)
        client = Client(serve.url)
        assert client.login(token)[0] == 303
        cookie = next(c.value for c in client.jar if c.name == COOKIE)
        stream = Sse(serve.url, cookie, "overview")
        try:
            stream.wait("ready")
            started = time.monotonic()
            assert serve.stop() == 0
            took = time.monotonic() - started
            assert stream.ends(within=2.0) == []  # ended, not cut by the graceful timeout
        finally:
            stream.close()
        assert took < 5.0, f"{took:.1f} s\n{serve.log()[-2000:]}"  # GRACEFUL_S is 10


# -- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    with browser() as it:
        yield it


def _text(web: Browser, element_id: str) -> str:
    return text_of(web.web, "id", element_id, default="")  # a live page swaps its parts


def _until(web: Browser, what: str, ok: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not ok():
        assert time.monotonic() < deadline, f"the page never showed {what}"
        time.sleep(0.2)
    assert web.web.execute_script("return window.__marker") == 1, "the page was reloaded"


def test_the_overview_follows_devices_appearing_and_going_offline(
    chrome: Browser, sqlite_url: str
) -> None:
    with live_app(sqlite_url, LiveOptions(tick_s=0.5)) as site:
        chrome.base = site.url
        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, site.viewer)
        chrome.web.execute_script("window.__marker = 1")
        _until(chrome, "the live badge", lambda: _text(chrome, "live-state") == "live")
        site.store("dev-new", status=status("online", "door"))
        _until(chrome, "dev-new", lambda: "dev-new" in _text(chrome, "devices"))
        assert _text(chrome, "count-total") == "4"
        offline = _text(chrome, "count-offline")
        site.store("dev-new", status=status("offline", "door"))
        _until(chrome, "dev-new offline", lambda: _text(chrome, "count-offline") != offline)
        assert _text(chrome, "count-offline") == str(int(offline) + 1)
        chrome.shot("live-overview")


def test_a_device_page_drawn_as_a_forms_answer_stays_live(chrome: Browser, sqlite_url: str) -> None:
    """A refused deploy draws the device page at the form's POST address: the page
    still follows the device (it fetches its data-live-url, not that address)."""
    with live_app(sqlite_url, LiveOptions(tick_s=0.5)) as site:
        chrome.base = site.url
        chrome.open("/ui/login")
        chrome.web.delete_all_cookies()
        log_in(chrome, site.operator)
        chrome.open("/ui/devices/dev-a")
        chrome.web.find_element("id", "version").send_keys("0")  # the form's pattern takes it
        chrome.web.find_element("id", "model").clear()
        chrome.web.find_element("id", "model").send_keys("no such model!")
        chrome.web.execute_script("window.confirm = () => true")
        chrome.web.find_element("id", "deploy").click()
        deadline = time.monotonic() + 10
        while not chrome.web.current_url.endswith("/ui/devices/dev-a/deploy"):
            assert time.monotonic() < deadline, chrome.web.current_url
            time.sleep(0.1)
        assert _text(chrome, "action-error")  # the refusal, in one line
        chrome.web.execute_script("window.__marker = 1")
        _until(chrome, "the live badge", lambda: _text(chrome, "live-state") == "live")
        site.store("dev-a", state=state("colours", 7))
        _until(chrome, "v7", lambda: "colours v7" in _text(chrome, "identity"))


def test_a_rollout_page_follows_the_rollout_to_its_end_without_reloading(
    chrome: Browser, broker: Mosquitto, tmp_path: Path
) -> None:
    rig = Rig(broker, f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        for name in ("d1", "d2", "d3"):
            rig.add(name)
        rig.wait_members(3)
        with rig.engine.begin() as conn:
            token = create_token(conn, "alice", "viewer", time.time())
        rollout_id = rig.create()
        app = create_app(rig.server())
        app.state.live.options = LiveOptions(tick_s=0.5)
        with running(app) as url:
            chrome.base = url
            chrome.open("/ui/login")
            chrome.web.delete_all_cookies()
            log_in(chrome, token)
            chrome.open(f"/ui/rollouts/{rollout_id}")
            assert _text(chrome, "rollout-status") == "running"
            chrome.web.execute_script("window.__marker = 1")
            _until(chrome, "the live badge", lambda: _text(chrome, "live-state") == "live")
            rig.driver()  # the steps start only now, under the open page
            _until(
                chrome,
                "the rollout succeed",
                lambda: _text(chrome, "rollout-status") == "succeeded",
                within=30.0,
            )
            _until(chrome, "every device", lambda: _text(chrome, "count-succeeded") == "3")
            for device in ("d1", "d2", "d3"):
                assert "succeeded" in _text(chrome, f"member-{device}")
            chrome.shot("live-rollout")
    finally:
        rig.close()


# -- the rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("overview", View("overview")),
        ("rollouts", View("rollouts")),
        ("releases", View("releases")),
        ("device:dev-a", View("device", "dev-a")),
        ("rollout:r-1", View("rollout", "r-1")),
        ("overview:x", "not one of"),
        ("device:", "view:"),
        ("device:a/b", "view:"),
        ("rollout:", "not one of"),
        ("rollout:" + "x" * 65, "not one of"),
        ("rollout:a\nb", "not one of"),
        ("", "not one of"),
    ],
)
def test_parse_view(text: str, expected: View | str) -> None:
    if isinstance(expected, View):
        assert live.parse_view(text) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            live.parse_view(text)


@pytest.mark.parametrize(
    ("total", "mine", "closing", "expected"),
    [
        (0, 0, False, None),
        (2, 1, False, None),
        (3, 0, False, 503),  # the server's cap
        (2, 2, False, 429),  # the session's
        (3, 2, False, 503),
        (0, 0, True, 503),  # stopping
    ],
)
def test_admission(total: int, mine: int, closing: bool, expected: int | None) -> None:
    refused = live.admission(total, mine, QUICK, closing)
    assert (refused[0] if refused else None) == expected


@pytest.mark.parametrize(
    ("age", "quiet", "signed_in", "closing", "sent", "current", "expected"),
    [
        (1, 0, True, False, "a", "a", None),
        (1, 0, True, False, "a", "b", "changed"),
        (1, 0, True, False, "a", None, None),  # the database away: no news
        (1, 1.0, True, False, "a", "a", "ping"),
        (1, 1.0, True, False, "a", "b", "changed"),  # an event is a heartbeat too
        (1, 0, False, False, "a", "b", "signed-out"),
        (30, 0, True, False, "a", "b", "expired"),
        (30, 0, False, True, "a", "b", "closing"),
        (1, 0, True, False, None, "a", "changed"),  # no baseline
    ],
)
def test_decide(
    age: float,
    quiet: float,
    signed_in: bool,
    closing: bool,
    sent: str | None,
    current: str | None,
    expected: str | None,
) -> None:
    got = live.decide(
        age_s=age,
        quiet_s=quiet,
        signed_in=signed_in,
        closing=closing,
        sent=sent,
        current=current,
        options=QUICK,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), b": ping\n\n"),
        (("changed", "overview", "abc"), b"id: abc\nevent: changed\ndata: overview\n\n"),
        (("ended", "signed\nout"), b"event: ended\ndata: signed out\n\n"),
        ((None, "x\r\nid: evil"), b"data: x  id: evil\n\n"),
    ],
)
def test_frame(args: tuple[Any, ...], expected: bytes) -> None:
    assert live.frame(*args) == expected


def test_fingerprints_move_with_what_each_view_shows(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        fill_fleet(engine)

        def prints() -> dict[str, str]:
            views = [View("overview"), View("releases"), View("rollouts"),
                     View("device", "dev-a"), View("device", "dev-b")]  # fmt: skip
            with engine.connect() as conn:
                return {f"{v.kind}:{v.key}": live.fingerprint(conn, v) for v in views}

        before = prints()
        assert prints() == before  # stable
        with engine.begin() as conn:
            upsert_device(conn, "dev-a", NOW + 1)  # only last_seen moves
        assert prints() == before
        with engine.begin() as conn:
            upsert_device(conn, "dev-a", NOW + 2, state=state("colours", 5))
        after = prints()
        moved = {k for k in before if before[k] != after[k]}
        assert moved == {"overview:", "releases:", "device:dev-a"}
    finally:
        engine.dispose()
