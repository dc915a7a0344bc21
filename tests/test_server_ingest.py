"""The fleet server's ingester against a real mosquitto and a real database (SQLite and
PostgreSQL): fake devices publish, rows appear, each message once; hostile messages are
counted and skipped; shared subscriptions split the work; nothing is lost across an
ingester restart or while the database is away."""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import ConfigError
from agent.fleet.broker import BrokerOptions
from agent.mqtt_reasons import explain, in_fleet_terms
from agent.server.db import open_database
from agent.server.inbound import Inbound, Malformed, read, subscriptions
from agent.server.ingest import Ingester, IngestOptions, IngestStats
from agent.server.schema import devices, events, messages, telemetry_raw
from tests.broker import Collector, Mosquitto, subscriber, wait_until
from tests.postgres import Postgres

WAIT_S = 15.0
_ids = itertools.count()


# -- documents as a device sends them ---------------------------------------------------


def _envelope() -> dict[str, Any]:
    n = next(_ids)
    return {"schema": 1, "seq": n, "id": f"m-{uuid.uuid4().hex[:12]}", "ts": time.time()}


def status(state: str = "online", **extra: Any) -> dict[str, Any]:
    return {"schema": 1, "ts": time.time(), "state": state, "groups": ["door"],
            "agent_version": "0.1.0", **extra}  # fmt: skip


def state_doc(version: int = 3) -> dict[str, Any]:
    return {
        **_envelope(),
        "agent_version": "0.1.0", "model": "colours", "version": version,
        "sha256": "ab" * 32, "backend": "cpu", "serving": version, "previous": None,
        "phase": "idle", "last_error": None, "update": None, "desired": None, "bad": [],
    }  # fmt: skip


def telemetry(fps: float = 9.5) -> dict[str, Any]:
    return {
        **_envelope(),
        "cpu_pct": 12.5,
        "inference": None,
        "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "overflow": 0},
        "mqtt": {"connected": True, "protocol": "5", "connects": 1, "inflight": 0,
                 "rejected": 0, "unsent_qos0": 0},
        "temp_c": fps,
    }  # fmt: skip


def event(name: str = "agent_started", **extra: Any) -> dict[str, Any]:
    return {**_envelope(), "event": name, **extra}


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# -- the pure part: what a message is ----------------------------------------------------

DEEP = b'{"a":' * 40 + b"1" + b"}" * 40


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("edge/cam-1/events", dumps(event()), "events"),
        ("edge/cam-1/status", dumps(status("offline", reason="lost")), "status"),
        ("edge/cam-1/state", dumps(state_doc()), "state"),
        ("edge/cam-1/telemetry", dumps(telemetry()), "telemetry"),
        ("edge/cam-1/reply", b'{"command":"ping","ok":true,"request_id":1}', "reply"),
        ("edge/cam-1/reply/abc", b'{"command":"ping","ok":false}', "reply"),
        ("other/cam-1/events", dumps(event()), "topic"),
        ("edge/-cam/events", dumps(event()), "topic"),
        ("edge/groups/events", dumps(event()), "topic"),
        ("edge/cam-1/results", dumps(event()), "topic"),
        ("edge/cam-1/events/x", dumps(event()), "topic"),
        ("edge/" + "d" * 129 + "/events", dumps(event()), "topic"),  # over the id column
        ("edge/cam-1/events", b"not json", "not_json"),
        ("edge/cam-1/events", b"\xff\xfe", "not_json"),
        ("edge/cam-1/events", b"[1, 2]", "not_json"),
        ("edge/cam-1/events", b'{"ts": NaN}', "not_json"),
        ("edge/cam-1/events", DEEP, "too_deep"),
        ("edge/cam-1/events", b'{"x":"' + b"a" * 300_000 + b'"}', "too_large"),
        ("edge/cam-1/events", dumps(event("no_such_event")), "events"),  # a newer agent's
        ("edge/cam-1/events", dumps(event("No such event!")), "contract"),
        ("edge/cam-1/events", dumps(event(7)), "contract"),
        ("edge/cam-1/telemetry", dumps({**telemetry(), "npu_pct": 3.5}), "telemetry"),
        (
            "edge/cam-1/telemetry",  # a Pi's firmware flags, one a newer agent's
            dumps({**telemetry(), "throttled": {"now": ["brownout"], "since_boot": []}}),
            "telemetry",
        ),
        ("edge/cam-1/telemetry", dumps({**telemetry(), "throttled": {"now": 5}}), "contract"),
        (
            "edge/cam-1/telemetry",  # a Pi's clock, Wi-Fi and addresses
            dumps(
                {
                    **telemetry(),
                    "cpu_freq_mhz": 1500.0,
                    "wifi_rssi_dbm": -52,
                    "ip_addresses": ["10.0.0.7", "fd00::2"],
                }
            ),
            "telemetry",
        ),
        ("edge/cam-1/telemetry", dumps({**telemetry(), "wifi_rssi_dbm": "-52"}), "contract"),
        ("edge/cam-1/telemetry", dumps({**telemetry(), "ip_addresses": "10.0.0.7"}), "contract"),
        ("edge/cam-1/state", dumps({**state_doc(), "update": {"x": 1}}), "contract"),
        ("edge/cam-1/events", dumps({**event(), "ts": "yesterday"}), "contract"),
        ("edge/cam-1/state", dumps({**state_doc(), "version": "3; rm -rf"}), "contract"),
        ("edge/cam-1/telemetry", dumps({**telemetry(), "\x1b[31m": 1}), "contract"),
        ("edge/cam-1/status", dumps({**status(), "state": "maybe"}), "contract"),
        ("edge/cam-1/reply", b'{"command":"ping"}', "contract"),
        ("edge/cam-1/events", dumps({**event(), "id": "x" * 65}), "key"),
    ],
)
def test_read_takes_a_device_message_or_says_why_not(
    topic: str, payload: bytes, expected: str
) -> None:
    got = read("edge", topic, payload)
    if isinstance(got, Malformed):
        assert got.reason == expected, got.detail
        assert got.detail.isprintable()
    else:
        assert got.stream == expected
        assert got.device == "cam-1"


def test_a_newer_agents_event_name_is_kept_in_the_stored_document() -> None:
    newer = read("edge", "edge/cam-1/events", dumps(event("no_such_event", detail="x")))
    assert isinstance(newer, Inbound)
    assert newer.doc["event"] == "no_such_event" and newer.doc["detail"] == "x"
    assert read("edge", "edge/" + "d" * 128 + "/events", dumps(event())).stream == "events"  # type: ignore[union-attr]


def test_a_message_without_an_id_is_keyed_by_its_bytes() -> None:
    will = dumps(status("offline", reason="lost"))
    first, again = read("edge", "edge/cam-1/status", will), read("edge", "edge/cam-1/status", will)
    other = read("edge", "edge/cam-2/status", will)
    later = read("edge", "edge/cam-1/status", dumps(status("offline", reason="lost")))
    assert isinstance(first, Inbound) and isinstance(again, Inbound)
    assert isinstance(other, Inbound) and isinstance(later, Inbound)
    assert first.key == again.key and first.key.startswith("h:") and len(first.key) <= 64
    assert len({first.key, other.key, later.key}) == 3
    with_id = read("edge", "edge/cam-1/events", dumps({**event(), "id": "abc"}))
    assert isinstance(with_id, Inbound) and with_id.key == "abc"


def test_strings_are_stored_printable() -> None:
    got = read("edge", "edge/cam-1/events", dumps(event("pipeline_error", error="\x1b[2Jboom")))
    assert isinstance(got, Inbound)
    assert got.doc["error"] == "\\x1b[2Jboom"


def test_subscriptions_share_the_streams_and_not_status_and_state() -> None:
    shared, plain = subscriptions("edge", "srv")
    assert shared == [
        "$share/srv/edge/+/telemetry",
        "$share/srv/edge/+/events",
        "$share/srv/edge/+/reply/#",
    ]
    assert plain == ["edge/+/status", "edge/+/state"]


# -- against a broker and a database ----------------------------------------------------


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = open_database(db_url)
    yield engine
    engine.dispose()


class Running:
    """Ingesters started in a test, stopped at its end."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.started: list[Ingester] = []

    def start(self, engine: sa.Engine, client_id: str = "srv-1", group: str = "srv") -> Ingester:
        ingester = Ingester(
            engine,
            BrokerOptions(self.broker.url),
            IngestOptions(client_id=client_id, group=group),
        )
        ingester.start()
        self.started.append(ingester)
        assert ingester.wait_connected(WAIT_S), "the ingester did not connect and subscribe"
        return ingester

    def stop_all(self) -> None:
        for ingester in self.started:
            ingester.stop()


@pytest.fixture
def running(broker: Mosquitto) -> Iterator[Running]:
    runs = Running(broker)
    yield runs
    runs.stop_all()


def _until(what: Callable[[], bool], message: Callable[[], object]) -> None:
    assert wait_until(what, WAIT_S), message()


def _taken(stats: IngestStats) -> int:
    return stats.stored + stats.duplicates + sum(stats.malformed.values())


def _count(engine: sa.Engine, table: sa.Table, *where: Any) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def _device(broker: Mosquitto, name: str) -> Collector:
    return subscriber(broker.url, [], client_id=name)


def test_device_messages_become_rows_each_once(
    broker: Mosquitto, engine: sa.Engine, running: Running
) -> None:
    with _device(broker, "cam-1") as cam:
        # Retained before any server runs: learned at start through the plain subscription.
        cam.publish("edge/cam-1/status", dumps(status()), retain=True)
        cam.publish("edge/cam-1/state", dumps(state_doc(3)), retain=True)
        ingester = running.start(engine)
        _until(lambda: ingester.snapshot().stored == 2, ingester.snapshot)
        repeated = event("update_succeeded", model="colours", version=3, update_id="u-1")
        for doc in (telemetry(7.0), repeated, repeated, event("agent_started")):
            cam.publish("edge/cam-1/" + ("telemetry" if "mqtt" in doc else "events"), dumps(doc))
        cam.publish("edge/cam-1/reply", b'{"command":"ping","ok":true,"request_id":7}')
        _until(lambda: _taken(ingester.snapshot()) == 7, ingester.snapshot)

    # A device whose connection dies: the broker publishes its Last Will (no id).
    will = dumps(status("offline", reason="lost"))
    dying = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam-2", protocol=mqtt.MQTTv5)
    dying.will_set("edge/cam-2/status", will, qos=1, retain=True)
    dying.connect("127.0.0.1", broker.port)
    dying.loop_start()
    assert wait_until(dying.is_connected, WAIT_S)
    dying.loop_stop()
    sock = dying.socket()
    assert sock is not None
    sock.close()  # no DISCONNECT: the broker sends the Will
    _until(lambda: _taken(ingester.snapshot()) == 8, ingester.snapshot)

    stats = ingester.snapshot()
    assert (stats.stored, stats.duplicates, stats.received) == (7, 1, 8)
    assert sum(stats.malformed.values()) == 0 and stats.queue_depth == 0
    assert stats.database_ok and stats.broker_connected
    assert stats.lag_s is not None and 0 <= stats.lag_s < 60
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(devices))}
        names = conn.execute(sa.select(events.c.event).order_by(events.c.id)).scalars().all()
        outcome = conn.execute(
            sa.select(events.c.model, events.c.version, events.c.update_id).where(
                events.c.event == "update_succeeded"
            )
        ).one()
        samples = dict(conn.execute(sa.select(telemetry_raw.c.metric, telemetry_raw.c.value)).all())
    assert rows["cam-1"].online is True and rows["cam-1"].groups == ["door"]
    assert (rows["cam-1"].model, rows["cam-1"].version) == ("colours", 3)
    assert rows["cam-2"].online is False and rows["cam-2"].status["reason"] == "lost"
    assert names == ["update_succeeded", "agent_started", "reply"]
    assert tuple(outcome) == ("colours", 3, "u-1")
    assert samples["temp_c"] == 7.0 and samples["outbox.depth"] == 0.0
    assert _count(engine, messages) == 7


def test_hostile_messages_are_counted_and_ingestion_goes_on(
    broker: Mosquitto, engine: sa.Engine, running: Running
) -> None:
    ingester = running.start(engine)
    hostile = [
        ("edge/cam-1/events", b"not json at all"),
        ("edge/cam-1/events", DEEP),
        ("edge/cam-1/telemetry", b'{"x":"' + b"\x1b" * 400_000 + b'"}'),
        ("edge/cam-1/state", dumps({**state_doc(), "version": "3; rm -rf /"})),
        ("edge/cam-1/status", dumps({**status(), "groups": "door"})),
        ("edge/-evil/events", dumps(event())),
        ("edge/cam-1/events", dumps({**event(), "id": "x" * 65})),
    ]
    with _device(broker, "cam-1") as cam:
        for topic, payload in hostile:
            cam.publish(topic, payload)
        cam.publish("edge/cam-1/events", dumps(event("agent_started")))
        _until(lambda: _taken(ingester.snapshot()) == len(hostile) + 1, ingester.snapshot)
    stats = ingester.snapshot()
    assert stats.stored == 1
    assert stats.malformed == {
        "topic": 1, "too_large": 1, "too_deep": 1, "not_json": 1, "contract": 2, "key": 1,
    }  # fmt: skip
    assert _count(engine, events) == 1 and _count(engine, devices) == 0


def test_an_ingester_restarted_with_its_client_id_loses_nothing(
    broker: Mosquitto, engine: sa.Engine, running: Running
) -> None:
    first = running.start(engine, client_id="srv-a")
    first.stop()
    with _device(broker, "cam-1") as cam:
        sent = [event("source_lost") for _ in range(10)]
        for doc in sent:  # the session on the broker holds them while no server runs
            cam.publish("edge/cam-1/events", dumps(doc))
        cam.publish("edge/cam-1/status", dumps(status()), retain=True)
    again = running.start(engine, client_id="srv-a")
    _until(lambda: _count(engine, events) == 10 and _count(engine, devices) == 1, again.snapshot)
    _until(lambda: _taken(again.snapshot()) >= 11, again.snapshot)
    time.sleep(0.3)  # a retained status sent again on the resumed subscription would show
    # Retain handling 1: the resumed plain subscription is not sent the retained again.
    assert (again.snapshot().stored, again.snapshot().duplicates) == (11, 0)


def test_an_ingester_reconnects_after_the_broker_restarts(
    broker: Mosquitto, tmp_path: Path, running: Running
) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        ingester = running.start(engine)
        broker.restart()  # without persistence: the session and subscriptions are gone
        _until(
            lambda: (s := ingester.snapshot()).connects == 2 and s.broker_connected,
            ingester.snapshot,
        )
        with _device(broker, "cam-1") as cam:
            cam.publish("edge/cam-1/events", dumps(event("agent_started")))
            _until(lambda: ingester.snapshot().stored == 1, ingester.snapshot)
        assert ingester.snapshot().broker_connected
    finally:
        running.stop_all()
        engine.dispose()


def test_the_ingester_logs_why_it_cannot_connect_and_when_it_connects_and_loses_the_broker(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.server.ingest")
    where = f"the broker at 127.0.0.1:{broker.port}"
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    broker.stop()
    ingester = Ingester(engine, BrokerOptions(broker.url), IngestOptions(client_id="srv-log"))
    ingester.start()
    try:
        _until(lambda: f"cannot connect to {where}: connection refused" in caplog.text, caplog)
        broker.start()
        assert ingester.wait_connected(WAIT_S), caplog.text
        assert f"connected to {where} (session new)" in caplog.text
        broker.stop()
        _until(lambda: f"lost {where} (connection dropped); reconnecting" in caplog.text, caplog)
    finally:
        ingester.stop()
        engine.dispose()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("cause", "says"),
    [
        (ConnectionRefusedError(), "connection refused: nothing listens there"),
        (socket.gaierror(-2, "Name or service not known"), "check --broker"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "TLS: the port"),
        (None, "(then use mqtts:// and --ca)"),
        (135, "(check --username, the password or the client certificate"),
    ],
)
def test_broker_failures_are_told_in_the_fleet_options_words(cause: Any, says: str) -> None:
    said = in_fleet_terms(explain(cause))
    assert says in said and "mqtt." not in said, said


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (IngestOptions(client_id="srv-1", group="a/b"), "group name 'a/b'"),
        (IngestOptions(client_id="srv+1"), "device id 'srv+1'"),
        (IngestOptions(client_id="srv-1", max_pending=0), "max_pending"),
    ],
)
def test_bad_ingest_options_are_refused_before_connecting(
    tmp_path: Path, options: IngestOptions, says: str
) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with pytest.raises(ConfigError, match=re.escape(says)):
        Ingester(engine, BrokerOptions("mqtt://127.0.0.1:1"), options)
    engine.dispose()


def test_two_ingesters_in_one_share_group_store_each_message_once(
    broker: Mosquitto, postgres: Postgres, running: Running
) -> None:
    url = postgres.new_database()
    engines = [open_database(url), open_database(url)]
    try:
        a = running.start(engines[0], client_id="srv-a")
        b = running.start(engines[1], client_id="srv-b")
        with _device(broker, "cam-1") as cam:
            cam.publish("edge/cam-1/status", dumps(status()), retain=True)  # both take it
            for _ in range(40):
                cam.publish("edge/cam-1/events", dumps(event("source_lost")))
            _until(
                lambda: _taken(a.snapshot()) + _taken(b.snapshot()) == 42,
                lambda: (a.snapshot(), b.snapshot()),
            )
        sa_, sb = a.snapshot(), b.snapshot()
        assert sa_.stored + sb.stored == 41 and sa_.duplicates + sb.duplicates == 1
        assert sa_.stored >= 5 and sb.stored >= 5, "the share group did not split the work"
        assert _count(engines[0], events) == 40 and _count(engines[0], messages) == 41
    finally:
        running.stop_all()
        for engine in engines:
            engine.dispose()


def test_database_away_holds_messages_unacknowledged_until_it_returns(
    broker: Mosquitto, postgres: Postgres, running: Running
) -> None:
    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    engine = open_database(url)
    admin = sa.create_engine(postgres.url.replace("postgresql://", "postgresql+psycopg://"))

    def allow(on: bool) -> None:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}'))
            if not on:
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :n"), {"n": name},
                )  # fmt: skip

    try:
        first = running.start(engine, client_id="srv-a")
        allow(False)
        with _device(broker, "cam-1") as cam:
            for _ in range(5):
                cam.publish("edge/cam-1/events", dumps(event("source_lost")))
            _until(lambda: not first.snapshot().database_ok, first.snapshot)
            _until(lambda: first.snapshot().received == 5, first.snapshot)
            held = first.snapshot()
            assert held.stored == 0 and held.queue_depth >= 4 and held.database_error
            first.stop()  # nothing was acknowledged: the broker keeps all five
            allow(True)
            again = running.start(engine, client_id="srv-a")
            _until(lambda: _count(engine, events) == 5, again.snapshot)
        assert again.snapshot().database_ok
        assert _count(engine, messages) == 5
    finally:
        allow(True)
        engine.dispose()
        admin.dispose()


def _refuse_events_of(engine: sa.Engine, device: str) -> None:
    """A trigger that makes the database refuse one device's events (a stand-in for any
    refusal of a message by the database itself, e.g. a value past a column's size)."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.device = '{device}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.device = '{device}' THEN RAISE EXCEPTION 'refused by a trigger'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW "
                "EXECUTE FUNCTION refuse()"
            )


def test_a_batch_stores_every_message_but_the_one_the_database_refuses(
    engine: sa.Engine, broker: Mosquitto
) -> None:
    from agent.server.ingest_batch import Pending

    _refuse_events_of(engine, "bad-1")
    ingester = Ingester(engine, BrokerOptions(broker.url), IngestOptions(client_id="srv-b"))
    now = time.time()
    batch = [
        Pending(topic, dumps(doc), mid, 0, 0, now)
        for mid, (topic, doc) in enumerate(
            [
                ("edge/ok-1/telemetry", telemetry()),
                ("edge/bad-1/events", event()),
                ("edge/ok-2/events", event()),
            ],
            start=1,
        )
    ]
    batch.append(Pending("edge/ok-2/events", b"not json", 4, 0, 0, now))
    ingester._take(batch)  # one batch, as the worker takes it
    stats = ingester.snapshot()
    assert (stats.stored, stats.duplicates) == (2, 0), stats
    assert stats.malformed["contract"] == 1 and stats.malformed["not_json"] == 1, stats
    assert _count(engine, events, events.c.device == "ok-2") == 1
    assert _count(engine, events, events.c.device == "bad-1") == 0
    assert _count(engine, telemetry_raw, telemetry_raw.c.device == "ok-1") > 0
    ingester._take(batch[:3])  # again: duplicates, refused again
    again = ingester.snapshot()
    assert (again.stored, again.duplicates, again.malformed["contract"]) == (2, 2, 2), again
