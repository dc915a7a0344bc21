"""The overview's alerts and the device page's charts and update history: tables for the
pure rules (agent/server/web/alerts.py, charts.py), their queries on SQLite and
PostgreSQL, and the pages in a real headless Chromium against the real app."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from agent.server.db import open_database
from agent.server.queries import Point
from agent.server.retention import numeric_samples
from agent.server.schema import deploys
from agent.server.store import insert_event, insert_telemetry, upsert_device
from agent.server.web import alerts, charts, formats, overview
from agent.server.web.alerts import Alert, Recent, Thresholds, device_alerts, summarise
from tests.browser import Browser, text_of
from tests.test_dashboard import Client, Dash, chrome, dashboard, log_in, sqlite_url
from tests.test_server_api import NOW, state, status, telemetry

__all__ = ["chrome", "sqlite_url"]  # fixtures used by name

# -- alerts: the rules, a table each -------------------------------------------------------


def row(
    online: bool = True,
    last_seen: float = NOW - 5,
    temp: float | None = 50.0,
    tpu: float | None = None,
    backend: str = "edgetpu",
    fresh: bool = True,
) -> dict[str, Any]:
    doc = telemetry(NOW - 10 if fresh else NOW - 3600, 9.0)
    doc["temp_c"] = temp
    if tpu is not None:
        doc["tpu_temp_c"] = tpu
    doc["inference"]["backend"] = backend
    return {"id": "cam-1", "online": online, "last_seen": last_seen, "state": None,
            "telemetry": doc}  # fmt: skip


def kinds(found: list[Alert]) -> list[str]:
    return [a.kind for a in found]


@pytest.mark.parametrize(
    ("online", "last_seen", "expected"),
    [
        (False, NOW - 601, ["offline"]),
        (False, NOW - 600, []),  # at the threshold: not yet
        (False, NOW - 3 * 86_400, ["offline"]),
        (True, NOW - 3 * 86_400, []),  # online (a quiet device): not offline
    ],
)
def test_offline_longer_than_the_threshold(
    online: bool, last_seen: float, expected: list[str]
) -> None:
    found = device_alerts(row(online, last_seen), Recent(), NOW)
    assert kinds(found) == expected


def test_an_offline_device_is_not_judged_on_its_stale_figures() -> None:
    hot = Recent(outbox_before=0, outbox_after=900, frames=1000, errors=900)
    found = device_alerts(row(False, NOW - 4000, temp=95.0), hot, NOW)
    assert kinds(found) == ["offline"]
    assert found[0].detail == "offline for 1 h"


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (10.0, 110.0, ["outbox"]),  # grew by the threshold
        (10.0, 109.0, []),
        (500.0, 100.0, []),  # draining
        (None, 400.0, []),  # only half a window: no trend
        (400.0, None, []),
    ],
)
def test_outbox_growing(before: float | None, after: float | None, expected: list[str]) -> None:
    found = device_alerts(row(), Recent(outbox_before=before, outbox_after=after), NOW)
    assert kinds(found) == expected


@pytest.mark.parametrize(
    ("temp", "tpu", "fresh", "expected"),
    [
        (80.0, None, True, ["temperature"]),
        (79.9, None, True, []),
        (60.0, 85.0, True, ["temperature"]),  # the Edge TPU's
        (None, None, True, []),  # no sensor
        (90.0, 90.0, False, []),  # telemetry an hour old: not live
    ],
)
def test_temperature_high(
    temp: float | None, tpu: float | None, fresh: bool, expected: list[str]
) -> None:
    found = device_alerts(row(temp=temp, tpu=tpu, fresh=fresh), Recent(), NOW)
    assert kinds(found) == expected


@pytest.mark.parametrize(
    ("frames", "errors", "expected"),
    [
        (1000.0, 51.0, ["errors"]),  # 5.1 %
        (1000.0, 50.0, []),  # 5 %: not more than the share
        (99.0, 99.0, []),  # too few frames to judge
        (None, 10.0, []),
        (1000.0, None, []),
    ],
)
def test_error_rate_up(frames: float | None, errors: float | None, expected: list[str]) -> None:
    found = device_alerts(row(), Recent(frames=frames, errors=errors), NOW)
    assert kinds(found) == expected


@pytest.mark.parametrize(
    ("fell", "recovered", "backend", "expected"),
    [
        (NOW - 60, None, "cpu", ["fallback"]),
        (NOW - 60, NOW - 30, "cpu", []),  # recovered since
        (NOW - 60, NOW - 90, "cpu", ["fallback"]),  # an older recovery
        (NOW - 60, None, "edgetpu", []),  # back on the TPU (after a restart)
        (NOW - 2 * 86_400, None, "cpu", []),  # too long ago
        (None, None, "cpu", []),  # a CPU-only device
    ],
)
def test_accelerator_fallen_back_to_cpu(
    fell: float | None, recovered: float | None, backend: str, expected: list[str]
) -> None:
    recent = Recent(fallback_ts=fell, recovered_ts=recovered)
    assert kinds(device_alerts(row(backend=backend), recent, NOW)) == expected


def throttled(now: list[str], since: list[str], fresh: bool = True) -> dict[str, Any]:
    device = row(fresh=fresh)
    device["telemetry"]["throttled"] = {"now": now, "since_boot": since}
    return device


@pytest.mark.parametrize(
    ("device", "detail"),
    [
        (throttled([], []), None),  # a Pi with nothing to say
        (row(), None),  # a board without get_throttled
        (
            throttled(["under_voltage", "throttled"], ["under_voltage", "throttled"]),
            "under-voltage, throttled now (check the power supply)",
        ),
        (throttled(["soft_temp_limit"], ["soft_temp_limit"]), "soft temperature limit now"),
        (throttled([], ["under_voltage"]), "under-voltage since boot (check the power supply)"),
        (throttled([], ["throttled"]), None),  # throttled once, over: not an alert
        (throttled(["under_voltage"], [], fresh=False), None),  # an hour old: not live
        (throttled(["a_newer_flag"], []), "a_newer_flag now"),  # a newer agent's name
    ],
)
def test_under_voltage_and_throttling_from_the_firmware_flags(
    device: dict[str, Any], detail: str | None
) -> None:
    found = [a for a in device_alerts(device, Recent(), NOW) if a.kind == "power"]
    assert [a.detail for a in found] == ([detail] if detail else [])


@pytest.mark.parametrize(
    ("limits", "device", "recent", "expected"),
    [  # the same figures judged by an operator's thresholds (serve --alert-*)
        (Thresholds(offline_s=120), row(False, NOW - 300), Recent(), ["offline"]),
        (Thresholds(offline_s=3600), row(False, NOW - 3000), Recent(), []),
        (Thresholds(temp_high_c=70), row(temp=72.0), Recent(), ["temperature"]),
        (Thresholds(temp_high_c=90), row(temp=85.0), Recent(), []),
        (Thresholds(error_share=0.01), row(), Recent(frames=1000, errors=20), ["errors"]),
        (Thresholds(error_share=0.5), row(), Recent(frames=1000, errors=400), []),
        (Thresholds(outbox_growth=10), row(), Recent(outbox_before=0, outbox_after=10), ["outbox"]),
        (Thresholds(outbox_growth=1000), row(), Recent(outbox_before=0, outbox_after=900), []),
    ],
)
def test_thresholds_are_the_operators(
    limits: Thresholds, device: dict[str, Any], recent: Recent, expected: list[str]
) -> None:
    found = device_alerts(device, recent, NOW, limits)
    assert kinds(found) == expected
    if expected == ["temperature"]:
        assert found[0].detail == "72.0 °C (alert at 70)"


def test_the_summary_counts_every_alert_and_lists_the_first() -> None:
    found = [Alert(f"d{i}", "offline", "x") for i in range(alerts.MAX_SHOWN + 5)]
    found.append(Alert("z", "errors", "y"))
    summary = summarise(found)
    assert summary.total == alerts.MAX_SHOWN + 6
    assert summary.kinds == [
        ("offline", "offline", alerts.MAX_SHOWN + 5),
        ("errors", "error rate up", 1),
    ]
    assert len(summary.shown) == alerts.MAX_SHOWN and summary.shown[0].device == "d0"


# -- charts: the drawing ------------------------------------------------------------------


def test_a_chart_spans_the_box_from_the_lowest_minimum_to_the_highest_maximum() -> None:
    metric = charts.METRICS[0]
    points = [Point(NOW - 3600, 1.0, 2.0, 3.0, 6), Point(NOW - 1800, 3.0, 4.0, 9.0, 6)]
    chart = charts.draw(metric, points, NOW - 3600, NOW)
    assert (chart.low, chart.high, chart.last, chart.points) == (1.0, 9.0, 4.0, 2)
    # x: 0 and the middle; y: 160 - 4 - (v - 1) * 19
    assert chart.line == "0.0,137.0 300.0,99.0"
    assert chart.band == "0.0,118.0 300.0,4.0 300.0,118.0 0.0,156.0"


@pytest.mark.parametrize(
    ("points", "line", "low", "high"),
    [
        ([], "", None, None),
        ([Point(NOW - 60, 5.0, 5.0, 5.0, 1)], "0.0,80.0", 4.0, 6.0),  # flat: the middle
        ([Point(NOW - 60, float("nan"), 1.0, 1.0, 1)], "", None, None),  # not finite: left out
        ([Point(NOW - 99_999, 0.0, 0.0, 1.0, 1)], "0.0,156.0", 0.0, 1.0),  # before: at the edge
    ],
)
def test_charts_of_few_or_odd_points(
    points: list[Point], line: str, low: float | None, high: float | None
) -> None:
    chart = charts.draw(charts.METRICS[0], points, NOW - 60, NOW)
    assert (chart.line, chart.low, chart.high) == (line, low, high)


@pytest.mark.parametrize(
    ("asked", "span"),
    [("1h", "1h"), ("24h", "24h"), ("7d", "7d"), (None, "1h"), ("30d", "1h"), ("7D", "1h")],
)
def test_the_span_is_one_of_three(asked: str | None, span: str) -> None:
    assert charts.span(asked) == span


# -- the queries, on both engines ----------------------------------------------------------


def seed(engine: sa.Engine) -> None:
    """cam-hot: online, 85 °C, its outbox growing, 10 % errors, fell back to the CPU,
    under-voltage (and its CPU clock, Wi-Fi and address);
    cam-ok: online and quiet; cam-gone: offline for an hour."""
    with engine.begin() as conn:
        for device in ("cam-hot", "cam-ok"):
            upsert_device(conn, device, NOW - 900, status=status("online", "door"))
            upsert_device(conn, device, NOW - 890, state=state("colours", 3))
        upsert_device(conn, "cam-gone", NOW - 3600, status=status("offline", "yard"))
        for i in range(15):  # one a minute over the window
            ts = NOW - 840 + 60 * i
            hot = telemetry(ts, 9.0, temp=85.0)
            hot.update(cpu_freq_mhz=600, wifi_rssi_dbm=-71, ip_addresses=["192.0.2.7"])
            hot["throttled"] = {"now": ["under_voltage"], "since_boot": ["under_voltage"]}
            hot["outbox"]["depth"] = 20 * i
            hot["inference"].update(frames=100 * i, errors=10 * i, backend="cpu")
            ok = telemetry(ts, 9.0)
            ok["inference"].update(frames=100 * i, errors=0)
            for device, doc in (("cam-hot", hot), ("cam-ok", ok)):
                insert_telemetry(conn, device, ts, numeric_samples(doc), doc=doc)
        insert_event(conn, "cam-hot", NOW - 300, {"event": "accelerator_fallback",
                     "backend": "cpu", "model": "colours", "version": 3})  # fmt: skip


def test_the_fleets_alerts_from_its_rows_and_aggregates(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        seed(engine)
        with engine.connect() as conn:
            recent = alerts.recent_figures(conn, NOW)
            found = alerts.fleet_alerts(conn, NOW)
    finally:
        engine.dispose()
    hot = recent["cam-hot"]
    assert hot.frames == 1400 and hot.errors == 140 and hot.fallback_ts == NOW - 300
    assert hot.outbox_before is not None and hot.outbox_after is not None
    assert hot.outbox_after - hot.outbox_before >= alerts.Thresholds().outbox_growth
    assert [(a.device, a.kind) for a in found.shown] == [
        ("cam-gone", "offline"),
        ("cam-hot", "outbox"),
        ("cam-hot", "temperature"),
        ("cam-hot", "errors"),
        ("cam-hot", "fallback"),
        ("cam-hot", "power"),  # its firmware's under-voltage, from the stored telemetry
    ]


def test_the_history_lists_the_devices_and_its_groups_deploys(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        seed(engine)
        with engine.begin() as conn:
            targets = (("a", "device", "cam-hot"), ("b", "group", "door"),
                       ("c", "group", "yard"), ("d", "device", "cam-ok"))  # fmt: skip
            for id_, kind, target in targets:
                conn.execute(
                    deploys.insert().values(
                        id=id_, created=NOW - ord(id_), who="olga", target_kind=kind,
                        target=target, model="colours", version=4, rollout_id=None,
                        desired={"issued_at": NOW},
                    )
                )  # fmt: skip
            failed = {"event": "update_failed", "model": "colours", "version": 4,
                      "update_id": "u9", "reason": "self-test failed"}  # fmt: skip
            insert_event(conn, "cam-hot", NOW - 50, failed)
            insert_event(conn, "cam-hot", NOW - 40, {"event": "source_lost"})
        with engine.connect() as conn:
            published, updates = charts.history(conn, "cam-hot", ["door"])
            drawn = charts.charts(conn, "cam-hot", "1h", NOW, raw_days=7)
    finally:
        engine.dispose()
    assert [(p["id"], p["target"], p["signed"]) for p in published] == [
        ("a", "device:cam-hot", False),
        ("b", "group:door", False),
    ]
    assert [(e["event"], e["update_id"]) for e in updates] == [("update_failed", "u9")]
    by_name = {c.metric.name: c for c in drawn}
    assert by_name["temp_c"].last == 85.0 and by_name["outbox.depth"].points == 14  # ts < now
    assert by_name["mem_pct"].points == 0  # the fake telemetry has no memory figure


# -- the pages ----------------------------------------------------------------------------


@pytest.fixture
def seeded(sqlite_url: str) -> Iterator[Dash]:
    with dashboard(sqlite_url) as dash:
        seed(dash.engine)
        yield dash


def test_the_device_page_draws_its_charts_in_the_browser(chrome: Browser, seeded: Dash) -> None:
    chrome.base = seeded.url
    chrome.open("/ui/login")
    chrome.web.delete_all_cookies()
    log_in(chrome, seeded.viewer)
    alerts_card = chrome.wait_id("alerts").text
    assert "temperature high" in alerts_card and "cam-gone" in alerts_card
    chrome.shot("overview-alerts")
    chrome.open("/ui/devices/cam-hot")
    for chart in charts.METRICS:
        element = chrome.wait_id("chart-" + chart.name.replace(".", "-").replace("_", "-"))
        assert chart.title in element.text
    lines = chrome.web.find_elements("css selector", "#charts svg polyline")
    assert len(lines) == 5  # memory: no samples, a line of text instead
    box = chrome.web.find_element("css selector", "#chart-temp-c svg").rect
    assert box["width"] > 100 and box["height"] == 128  # 8rem: panels.css is applied
    assert "No samples" in text_of(chrome.web, "id", "chart-mem-pct")
    chrome.shot("device-charts")
    chrome.web.find_element("link text", "7d").click()
    chrome.wait_path("/ui/devices/cam-hot?span=7d")
    assert chrome.web.find_element("css selector", "#spans strong").text == "7d"
    assert len(chrome.web.find_elements("css selector", "#charts svg polyline")) == 5


def test_the_device_page_has_no_inline_style_and_the_history(seeded: Dash) -> None:
    client = Client(seeded.url)
    client.login(seeded.viewer)
    status_code, headers, page = client.request("GET", "/ui/devices/cam-hot?span=24h")
    assert status_code == 200
    assert "style=" not in page and "<style" not in page
    assert "'unsafe-inline'" not in headers["content-security-policy"]
    assert re.search(r'<polyline class="line" points="[0-9., ]+"', page)
    assert 'id="deploys"' in page and "No desired state was published" in page
    for bad in ("x" * 5000, "%00", "1y"):  # any other span: the default
        assert client.request("GET", f"/ui/devices/cam-hot?span={bad}")[0] == 200
    # the Pi's own health, as cam-hot reports it; cam-ok's board reports none of it
    assert "<dt>CPU clock</dt><dd>600 MHz</dd>" in page
    assert "<dt>Wi-Fi</dt><dd>-71 dBm</dd>" in page and "192.0.2.7" in page
    assert '<dt>Power</dt><dd class="error">under-voltage now; since boot: under-voltage' in page
    quiet = client.request("GET", "/ui/devices/cam-ok")[2]
    assert "<dt>Power</dt>" not in quiet and "<dt>Wi-Fi</dt>" not in quiet


@pytest.mark.parametrize(
    ("telemetry_doc", "rows"),
    [
        ({}, []),  # not a Pi, or nothing live
        (
            {"cpu_freq_mhz": 1500.0, "wifi_rssi_dbm": -60, "ip_addresses": ["10.0.0.2", "fe80::1"]},
            [("CPU clock", "1500 MHz", False), ("Wi-Fi", "-60 dBm", False),
             ("Addresses", "10.0.0.2, fe80::1", False)],
        ),
        ({"throttled": {"now": [], "since_boot": []}}, [("Power", "fine now", False)]),
        (
            {"throttled": {"now": ["throttled"], "since_boot": ["throttled", "new_flag"]}},
            [("Power", "throttled now; since boot: throttled, new_flag", True)],
        ),
        ({"cpu_freq_mhz": True, "wifi_rssi_dbm": "x", "ip_addresses": "1.2.3.4"}, []),
    ],
)  # fmt: skip
def test_health_rows(telemetry_doc: dict[str, Any], rows: list[tuple[str, str, bool]]) -> None:
    assert overview.health(telemetry_doc) == rows


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"event": "agent_started", "version": 3}, '{"event": "agent_started", "version": 3}'),
        (
            {"lines": ["x"] * 10_000, "cfg": {"a": 1}, "e": {}},
            '{"lines": "[…]", "cfg": "{…}", "e": {}}',
        ),
        ({"detail": "é" * 500}, '{"detail": "' + "é" * 79 + '…"}'),
        (None, "—"),
    ],
)  # fmt: skip
def test_an_events_preview_is_short_whatever_its_size(fields: Any, text: str) -> None:
    assert formats.preview(fields) == text


def test_an_events_preview_is_cut_at_its_limit() -> None:
    long = {f"k{i}": "v" * 70 for i in range(30)}
    text = formats.preview(long)
    assert len(text) == 160 and text.endswith("…")
