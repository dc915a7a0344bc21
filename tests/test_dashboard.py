"""The dashboard (/ui) in a real headless Chromium and over plain HTTP, against the real
app on a real uvicorn, its database filled through the ingester's own writes
(agent/server/store.py). Deploys go to a real mosquitto. Screenshots: screenshots/."""

from __future__ import annotations

import http.cookiejar
import itertools
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.broker import BrokerOptions, FleetBroker
from agent.server.auth import create_token, revoke_token
from agent.server.db import open_database
from agent.server.schema import audit, deploys, ui_sessions
from agent.server.store import insert_event, upsert_device
from agent.server.web import formats, overview, sessions
from agent.server.web.overview import Bar, paginate, updating, version_bars
from tests.browser import Browser, browser, text_of
from tests.serverhttp import app_over
from tests.test_server_api import NOW, fill_fleet

_names = itertools.count()


@dataclass
class Dash:
    url: str
    engine: sa.Engine
    viewer: str
    operator: str

    def token(self, role: str) -> tuple[str, str]:
        """A new token: (name, token)."""
        name = f"{role}-{next(_names)}"
        with self.engine.begin() as conn:
            return name, create_token(conn, name, role, NOW)  # type: ignore[arg-type]

    def revoke(self, name: str) -> None:
        with self.engine.begin() as conn:
            assert revoke_token(conn, name, NOW)

    def audit(self) -> list[tuple[str, str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit.c.who, audit.c.action, audit.c.outcome))
            return [tuple(r) for r in rows]  # type: ignore[misc]


@contextmanager
def dashboard(db_url: str, publisher: Any = None) -> Iterator[Dash]:
    tokens: list[str] = []

    def prepare(engine: sa.Engine) -> None:
        fill_fleet(engine)
        with engine.begin() as conn:
            insert_event(conn, "dev-a", NOW - 10, {"event": "model_loaded", "model": "colours",
                                                   "version": 3, "backend": "cpu"})  # fmt: skip
            tokens.append(create_token(conn, "alice", "viewer", NOW))
            tokens.append(create_token(conn, "olga", "operator", NOW))

    with app_over(db_url, now=NOW, prepare=prepare, publisher=publisher) as (url, engine, _):
        yield Dash(url, engine, *tokens)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def dash(sqlite_url: str) -> Iterator[Dash]:
    with dashboard(sqlite_url) as it:
        yield it


@pytest.fixture(scope="module")
def chrome() -> Iterator[Browser]:
    with browser() as it:
        yield it


@pytest.fixture
def web(chrome: Browser, dash: Dash) -> Browser:
    chrome.base = dash.url
    chrome.open("/ui/login")
    chrome.web.delete_all_cookies()
    return chrome


# -- a small form client (urllib with cookies) ------------------------------------------


class Client:
    """A browser without JavaScript: cookies kept, redirects not followed."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        for name, value in headers.items():
            request.add_header(name.replace("_", "-"), value)
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def login(self, token: str) -> tuple[int, dict[str, str], str]:
        return self.request("POST", "/ui/login", {"token": token})

    def csrf(self, path: str = "/ui/") -> str:
        status, _, page = self.request("GET", path)
        assert status == 200, page
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None
        return found.group(1)


# -- in the browser ---------------------------------------------------------------------


def log_in(web: Browser, token: str, lands: str = "/ui/") -> None:
    web.open("/ui/login")
    web.web.find_element("id", "token").send_keys(token)
    web.web.find_element("id", "login").click()
    web.wait_path(lands)


def test_a_viewer_sees_the_fleet_and_no_action_buttons(web: Browser, dash: Dash) -> None:
    log_in(web, dash.viewer)
    table = text_of(web.web, "id", "devices")
    assert all(device in table for device in ("dev-a", "dev-b", "dev-c"))
    assert text_of(web.web, "id", "count-online") == "2"
    assert text_of(web.web, "id", "count-offline") == "1"
    assert text_of(web.web, "id", "count-updating") == "1"  # dev-c downloading
    assert "alice · viewer" in text_of(web.web, "id", "who")
    web.shot("overview-viewer")
    web.web.find_element("link text", "dev-a").click()
    web.wait_path("/ui/devices/dev-a")
    assert text_of(web.web, "id", "device-id") == "dev-a"
    assert "model_loaded" in text_of(web.web, "id", "events")
    assert web.web.find_elements("id", "update") == []  # dev-a has no update under way
    assert web.web.find_elements("id", "actions") == []
    assert web.web.find_elements("id", "deploy") == []
    web.shot("device-viewer")


def test_an_operator_sees_the_deploy_form(web: Browser, dash: Dash) -> None:
    log_in(web, dash.operator)
    web.open("/ui/devices/dev-a")
    assert web.web.find_element("id", "deploy").is_displayed()
    assert web.web.find_element("id", "model").get_attribute("value") == "colours"
    web.open("/ui/devices/dev-c")
    assert web.wait_id("update").text == "colours v4: downloading"
    web.shot("device-operator")


def test_a_wrong_token_is_an_error_on_the_login_page(web: Browser, dash: Dash) -> None:
    log_in(web, "eft_not-a-token-of-this-server", lands="/ui/login")
    assert "not valid" in web.wait_id("login-error").text
    assert web.web.get_cookies() == []
    web.shot("login-refused")


def test_logout_returns_to_the_login_page_and_the_session_is_gone(web: Browser, dash: Dash) -> None:
    log_in(web, dash.viewer)
    web.web.find_element("id", "logout").click()
    web.wait_path("/ui/login")
    web.open("/ui/")
    web.wait_path("/ui/login")
    with dash.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ui_sessions)).scalar() == 0
    assert [a for a in dash.audit() if a[1].startswith("ui.")] == [
        ("alice", "ui.login", "ok"),
        ("alice", "ui.logout", "ok"),
    ]


def test_a_revoked_tokens_session_stops_working(web: Browser, dash: Dash) -> None:
    name, token = dash.token("viewer")
    log_in(web, token)
    dash.revoke(name)
    web.web.refresh()
    web.wait_path("/ui/login")


def test_the_overview_is_readable_on_a_phone(web: Browser, dash: Dash) -> None:
    web.web.set_window_size(390, 844)
    try:
        log_in(web, dash.viewer)
        width = web.web.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390  # no sideways scrolling of the page (the table scrolls itself)
        web.shot("overview-phone")
    finally:
        web.web.set_window_size(1280, 900)


# -- over HTTP ------------------------------------------------------------------------


def test_the_session_cookie_is_httponly_strict_and_only_its_hash_is_stored(dash: Dash) -> None:
    client = Client(dash.url)
    status, headers, _ = client.login(dash.viewer)
    assert status == 303 and headers["location"] == "/ui/"
    cookie = headers["set-cookie"]
    assert cookie.startswith("edge_fleet_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here; https sets it
    secret = cookie.split(";", 1)[0].split("=", 1)[1]
    with dash.engine.connect() as conn:
        assert conn.execute(sa.select(ui_sessions.c.id)).scalars().all() == [
            sessions.session_id(secret)
        ]


def test_a_page_without_a_session_redirects_to_login(dash: Dash) -> None:
    for path in ("/ui/", "/ui/devices/dev-a"):
        status, headers, _ = Client(dash.url).request("GET", path)
        assert (status, headers["location"]) == (303, "/ui/login")


def test_a_post_without_the_csrf_field_is_403(dash: Dash) -> None:
    client = Client(dash.url)
    client.login(dash.operator)
    status, _, page = client.request("POST", "/ui/logout", {})
    assert status == 403 and "CSRF" in page
    status, _, page = client.request(
        "POST", "/ui/devices/dev-a/deploy", {"csrf": "wrong", "model": "colours", "version": "4"}
    )
    assert status == 403 and "CSRF" in page
    assert client.request("GET", "/ui/")[0] == 200  # still logged in
    with dash.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(deploys)).scalar() == 0


def test_a_form_from_another_site_is_403(dash: Dash) -> None:
    client = Client(dash.url)
    client.login(dash.operator)
    csrf = client.csrf()
    status, _, _ = client.request(
        "POST", "/ui/logout", {"csrf": csrf}, Origin="https://evil.example"
    )
    assert status == 403
    status, _, _ = client.request("POST", "/ui/login", {"token": dash.viewer}, Origin="null")
    assert status == 403


def test_a_viewer_cannot_deploy_even_with_the_csrf_token(dash: Dash) -> None:
    client = Client(dash.url)
    client.login(dash.viewer)
    csrf = client.csrf("/ui/devices/dev-a")
    status, _, page = client.request(
        "POST", "/ui/devices/dev-a/deploy", {"csrf": csrf, "model": "colours", "version": "4"}
    )
    assert status == 403 and "operator" in page


def test_an_operators_deploy_goes_through_the_api_code(sqlite_url: str, broker: Any) -> None:
    publisher = FleetBroker(BrokerOptions(broker.url))
    publisher.connect()
    try:
        with dashboard(sqlite_url, publisher) as dash:
            client = Client(dash.url)
            client.login(dash.operator)
            csrf = client.csrf("/ui/devices/dev-a")
            form = {"csrf": csrf, "model": "colours", "version": "x"}
            status, _, page = client.request("POST", "/ui/devices/dev-a/deploy", form)
            assert status == 422 and "is not a positive integer" in page
            form["version"] = "4"
            status, headers, _ = client.request("POST", "/ui/devices/dev-a/deploy", form)
            assert (status, headers["location"]) == (303, "/ui/devices/dev-a?done=deploy")
            with dash.engine.connect() as conn:
                row = conn.execute(sa.select(deploys)).one()
            assert (row.who, row.target, row.model, row.version) == ("olga", "dev-a", "colours", 4)
            assert ("olga", "deploy", "ok") in dash.audit()
    finally:
        publisher.close()


def test_sessions_on_both_engines_end_with_their_token(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        with engine.begin() as conn:
            token = create_token(conn, "carol", "operator", NOW)
            secret, made = sessions.create_session(conn, token, NOW) or ("", None)
            assert made is not None and made.caller.role == "operator"
            assert sessions.create_session(conn, "eft_unknown", NOW) is None
        with engine.begin() as conn:
            found = sessions.find_session(conn, secret, NOW + 60)
            assert found is not None and found.csrf == made.csrf
            assert sessions.find_session(conn, secret, NOW + sessions.SESSION_S + 1) is None
            assert sessions.find_session(conn, secret + "x", NOW) is None
            revoke_token(conn, "carol", NOW)
            assert sessions.find_session(conn, secret, NOW + 60) is None
    finally:
        engine.dispose()


def test_the_device_table_is_paginated_by_fifty(sqlite_url: str) -> None:
    with dashboard(sqlite_url) as dash:
        with dash.engine.begin() as conn:
            for n in range(117):
                upsert_device(conn, f"cam-{n:03d}", NOW, status={"state": "online", "groups": []})
        client = Client(dash.url)
        client.login(dash.viewer)
        pages = []
        for page in (1, 3, 99):
            status, _, html = client.request("GET", f"/ui/?page={page}")
            assert status == 200
            pages.append(re.findall(r'<td><a href="/ui/devices/([^"]+)"', html))
        assert len(pages[0]) == 50 and pages[0][0] == "cam-000"
        assert len(pages[1]) == 20 and pages[1][-1] == "dev-c"  # 120 devices: the last page
        assert pages[2] == pages[1]  # past the end: the last page
        assert client.request("GET", "/ui/?page=0")[0] == 422


# -- pure rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "page", "expected"),
    [
        (0, 1, (1, 1, 0, None, None)),
        (50, 1, (1, 1, 0, None, None)),
        (51, 2, (2, 2, 50, 1, None)),
        (120, 2, (2, 3, 50, 1, 3)),
        (120, 9, (3, 3, 100, 2, None)),
    ],
)
def test_paginate(total: int, page: int, expected: tuple[Any, ...]) -> None:
    p = paginate(total, page)
    assert (p.page, p.pages, p.offset, p.previous, p.next) == expected


def test_version_bars_most_devices_first_with_their_share() -> None:
    bars = version_bars([("colours", 2, 1), (None, None, 1), ("colours", 3, 2)], 4)
    assert bars == [
        Bar("colours v3", 2, 50.0),
        Bar("colours v2", 1, 25.0),
        Bar("no model yet", 1, 25.0),
    ]
    assert version_bars([], 0) == []
    assert len(version_bars([("m", v, 1) for v in range(80)], 80)) == overview.MAX_BARS


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"phase": "downloading"}, True),
        ({"phase": "probation"}, True),
        ({"phase": "idle"}, False),
        ({"phase": "succeeded"}, False),  # a finished update's outcome
        ({"phase": "failed"}, False),
        ({"phase": "rolled_back"}, False),
        ({"phase": "dancing"}, False),
        ({"phase": None}, False),
        ({}, False),
        ("not a document", False),
        (None, False),
    ],
)
def test_updating(state: Any, expected: bool) -> None:
    assert updating(state) is expected


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"token=eft_x&csrf=a", "application/x-www-form-urlencoded; charset=utf-8",
         {"token": "eft_x", "csrf": "a"}),
        (b"a=1&a=2", "application/x-www-form-urlencoded; charset=utf-8", {"a": "1"}),
        (b"", "application/x-www-form-urlencoded", {}),
        (b"{}", "application/json", "application/x-www-form-urlencoded"),
        (b"x=" + b"a" * 17_000, "application/x-www-form-urlencoded", "at most"),
        (b"&".join(b"f%d=1" % n for n in range(30)), "application/x-www-form-urlencoded", "fields"),
        (b"x=%ff", "application/x-www-form-urlencoded", "UTF-8"),
    ],
)  # fmt: skip
def test_parse_form(body: bytes, content_type: str, expected: Any) -> None:
    if isinstance(expected, dict):
        assert sessions.parse_form(body, content_type) == expected
    else:
        with pytest.raises(sessions.FormError, match=expected):
            sessions.parse_form(body, content_type)


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        (None, "127.0.0.1:8080", True),
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://Fleet.example", "fleet.example", True),
        ("http://127.0.0.1:9999", "127.0.0.1:8080", False),
        ("null", "127.0.0.1:8080", False),
        ("http://evil.example", None, False),
    ],
)
def test_same_origin(origin: str | None, host: str | None, expected: bool) -> None:
    assert sessions.same_origin(origin, host) is expected


def test_csrf_ok_only_for_the_exact_secret() -> None:
    assert sessions.csrf_ok("s3cret", "s3cret")
    for given in (None, "", "s3cre", "s3cret ", "x" * 500):
        assert not sessions.csrf_ok("s3cret", given)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (NOW - 5, "5 s ago"),
        (NOW - 300, "5 min ago"),
        (NOW - 7200, "2 h ago"),
        (NOW - 3 * 86_400, "3 d ago"),
        (NOW + 30, "0 s ago"),  # a little clock skew
        (NOW + 3600, "in the future"),
        (None, "—"),
        (float("nan"), "—"),
        (True, "—"),
    ],
)
def test_ago(ts: Any, expected: str) -> None:
    assert formats.ago(ts, NOW) == expected


def test_when_and_figure() -> None:
    assert formats.when(0) == "1970-01-01 00:00:00Z"
    assert formats.when(float("inf")) == "—"
    assert formats.figure(9.46) == "9.5" and formats.figure(None) == "—"
    assert formats.figure(4, 0) == "4"


def test_every_template_and_static_file_is_package_data() -> None:
    """The wheel ships the pages' files: each matches a glob of pyproject's package-data
    (the server may run with no internet: no CDN to fall back on)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["agent.server.web"]
    web = root / "agent" / "server" / "web"
    files = [p for folder in ("templates", "static") for p in (web / folder).iterdir()]
    assert files
    for path in files:
        assert any(path.relative_to(web).match(g) for g in globs), path


@pytest.mark.parametrize(
    ("telemetry_ts", "online", "expected"),
    [
        (1_000.0, True, 1_000.0),  # telemetry after the last state message: heard then
        (500.0, True, 900.0),  # older telemetry: the row's time
        (5_000.0, True, 2_000.0),  # a device clock ahead: never later than now
        (1_000.0, False, 900.0),  # offline: the row's time (the will's, the server's)
        (None, True, 900.0),
        (True, True, 900.0),
        (float("nan"), True, 900.0),
    ],
)
def test_heard_is_the_later_of_the_row_and_live_telemetry(
    telemetry_ts: Any, online: bool, expected: float
) -> None:
    assert overview.heard(900.0, telemetry_ts, online, 2_000.0) == expected
