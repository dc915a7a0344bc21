"""The fleet server's storage on SQLite and on a real PostgreSQL: migrations, schema,
idempotent messages, device upserts, telemetry aggregates, retention, and errors."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from agent.errors import DatabaseError
from agent.server import retention
from agent.server.bulk import Key, record_messages
from agent.server.db import MIGRATIONS, alembic_config, open_database, parse_url
from agent.server.schema import (
    device_groups,
    devices,
    messages,
    metadata,
    telemetry_agg,
    telemetry_raw,
)
from agent.server.store import insert_telemetry, prune, upsert_device
from tests.postgres import Postgres


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = open_database(db_url)
    yield engine
    engine.dispose()


def parse_engine(url: str) -> sa.Engine:
    """A bare engine on ``url`` (no migrations run)."""
    return sa.create_engine(parse_url(url))


def _head() -> str | None:
    with sa.create_engine("sqlite://").connect() as conn:
        return ScriptDirectory.from_config(alembic_config(conn)).get_current_head()


def test_migrations_create_the_schema_and_a_second_start_changes_nothing(db_url: str) -> None:
    first = open_database(db_url)
    with first.begin() as conn:
        upsert_device(conn, "cam-1", 100.0, status={"state": "online", "groups": ["door"]})
    first.dispose()
    second = open_database(db_url)  # a restart: migrations run again, as a no-op
    with second.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        tables = set(sa.inspect(conn).get_table_names())
        kept = conn.execute(sa.select(devices.c.id)).scalars().all()
    second.dispose()
    assert version == _head() == "0007"
    assert tables == set(metadata.tables) | {"alembic_version"}
    assert kept == ["cam-1"]


def test_migration_0002_keeps_devices_and_adds_their_latest_telemetry(db_url: str) -> None:
    engine = parse_engine(db_url)
    try:
        with engine.begin() as conn:  # a database of the first release: 0001 only
            command.upgrade(alembic_config(conn), "0001")
            conn.execute(
                sa.text(
                    "INSERT INTO devices (id, groups, first_seen, last_seen, online) "
                    "VALUES ('cam-1', '[]', 1, 2, false)"
                )
            )
    finally:
        engine.dispose()
    upgraded = open_database(db_url)
    try:
        with upgraded.begin() as conn:
            assert conn.execute(sa.select(devices.c.telemetry)).scalar_one() is None
            insert_telemetry(conn, "cam-1", 50.0, {"cpu_pct": 1.0}, doc={"ts": 50.0, "n": 1})
            insert_telemetry(conn, "cam-1", 40.0, {"cpu_pct": 2.0}, doc={"ts": 40.0, "n": 2})
            row = conn.execute(sa.select(devices.c.telemetry, devices.c.telemetry_ts)).one()
        assert row.telemetry == {"ts": 50.0, "n": 1} and row.telemetry_ts == 50.0  # newest kept
    finally:
        upgraded.dispose()


def test_migrated_schema_equals_the_metadata(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_the_schema_comparison_sees_a_difference(engine: sa.Engine) -> None:
    """The comparison above is live: a column the database lacks is reported."""
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["leases"].append_column(sa.Column("note", sa.Text))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), changed)
    assert [d[0] for d in diff] == ["add_column"]


def test_two_instances_starting_together_migrate_once(postgres: Postgres) -> None:
    """Two servers opening one new PostgreSQL database at the same moment: the advisory
    lock makes the second wait and find the schema current, instead of failing."""
    url = postgres.new_database()
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def start() -> None:
        barrier.wait(10)
        try:
            open_database(url).dispose()
            outcomes.append("ok")
        except DatabaseError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == ["ok", "ok"]


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar_one() == 1
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.insert(device_groups).values(device="nobody", group_name="g"))
    engine.dispose()


DOC = {"schema": 1, "seq": 7, "id": "a1b2c3", "ts": 1764500000.0, "cpu_pct": 3.0}


def record_message(conn: sa.Connection, stream: str, msg_id: str, received: float) -> bool:
    """Record one message of cam-1 (as DOC) under ``msg_id``; True when it is new."""
    key = Key(msg_id, "cam-1", stream, DOC["seq"], DOC["ts"], received)  # type: ignore[arg-type]
    return record_messages(conn, [key]) == {msg_id}


def test_a_message_id_is_recorded_once(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        first = record_message(conn, "telemetry", "a1b2c3", 1.0)
        again = record_message(conn, "telemetry", "a1b2c3", 2.0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages)).all()
    assert (first, again) == (True, False)
    assert [(r.id, r.seq, r.ts, r.received) for r in rows] == [("a1b2c3", 7, 1764500000.0, 1.0)]


def test_one_message_id_from_two_connections_is_recorded_once(engine: sa.Engine) -> None:
    """The first connection holds its insert uncommitted while the second tries the same
    id; the second waits, then finds it (two server instances taking one message)."""
    results: list[bool] = []
    inserted = threading.Event()

    def second() -> None:
        inserted.wait(10)
        with engine.begin() as conn:
            results.append(record_message(conn, "events", "dup", 2.0))

    thread = threading.Thread(target=second)
    thread.start()
    with engine.begin() as conn:
        results.append(record_message(conn, "events", "dup", 1.0))
        inserted.set()
        time.sleep(0.3)  # the second insert is now waiting on this transaction
    thread.join(15)
    assert not thread.is_alive()
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one()
    assert results == [True, False]
    assert count == 1


def test_device_upsert_keeps_first_seen_and_moves_last_seen(engine: sa.Engine) -> None:
    status = {"state": "online", "groups": ["yard", "door"], "agent_version": "0.1.0"}
    state = {"model": "colours", "version": 2, "agent_version": "0.2.0", "phase": "idle"}
    with engine.begin() as conn:
        upsert_device(conn, "cam-1", 100.0, status=status)
        upsert_device(conn, "cam-1", 200.0, state=state)
        # the clock of the next one is behind: last_seen does not move back, and the
        # columns follow the document applied last
        moved = {**status, "groups": ["door"], "agent_version": "0.2.0"}
        upsert_device(conn, "cam-1", 150.0, status=moved)
        upsert_device(conn, "cam-1", 250.0, status={"state": "offline", "reason": "lost"})
    with engine.connect() as conn:
        row = conn.execute(sa.select(devices)).one()
        groups = conn.execute(sa.select(device_groups.c.group_name)).scalars().all()
    assert (row.first_seen, row.last_seen) == (100.0, 250.0)
    assert (row.model, row.version, row.agent_version) == ("colours", 2, "0.2.0")
    assert row.online is False
    assert row.state == state and row.status == {"state": "offline", "reason": "lost"}
    assert row.groups == ["door"] and groups == ["door"]  # the Last Will named none


def test_telemetry_is_kept_raw_and_folded_into_minutes(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        insert_telemetry(conn, "cam-1", 120.5, {"fps": 10.0, "cpu_pct": 1.0})
        insert_telemetry(conn, "cam-1", 179.9, {"fps": 20.0})
        insert_telemetry(conn, "cam-1", 180.0, {"fps": 5.0})
    with engine.connect() as conn:
        raw = conn.execute(sa.select(sa.func.count()).select_from(telemetry_raw)).scalar_one()
        agg = conn.execute(
            sa.select(telemetry_agg).where(telemetry_agg.c.metric == "fps").order_by("bucket")
        ).all()
    assert raw == 4
    assert [(a.bucket, a.min, a.max, a.sum, a.count) for a in agg] == [
        (120.0, 10.0, 20.0, 30.0, 2),
        (180.0, 5.0, 5.0, 5.0, 1),
    ]


def test_prune_removes_exactly_what_is_past_retention(engine: sa.Engine) -> None:
    now = 1000 * retention.DAY_S
    raw_cut, agg_cut = now - 7 * retention.DAY_S, now - 90 * retention.DAY_S
    with engine.begin() as conn:
        for ts in (raw_cut - 1, raw_cut, now):
            insert_telemetry(conn, "cam-1", ts, {"fps": 1.0})
        for ts in (agg_cut - 60, agg_cut):
            insert_telemetry(conn, "cam-1", ts, {"fps": 1.0})
        for i, received in enumerate((raw_cut - 0.5, raw_cut)):
            record_message(conn, "telemetry", f"m{i}", received)
    with engine.begin() as conn:
        pruned = prune(conn, now, raw_days=7, agg_days=90)
    with engine.connect() as conn:
        raw = conn.execute(sa.select(telemetry_raw.c.ts).order_by("ts")).scalars().all()
        buckets = conn.execute(sa.select(telemetry_agg.c.bucket).order_by("bucket")).scalars()
        ids = conn.execute(sa.select(messages.c.id)).scalars().all()
    assert raw == [raw_cut, now]
    assert list(buckets) == sorted({agg_cut, raw_cut - 60, raw_cut, now})
    assert ids == ["m1"]
    assert (pruned.raw, pruned.agg, pruned.messages) == (3, 1, 1)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "is not valid"),
        ("mysql://u@127.0.0.1/fleet", "is not supported"),
        ("sqlite://", "names no file"),
        ("sqlite:////nonexistent-dir/fleet.db", "unable to open database file"),
        ("postgresql://u:secret@127.0.0.1:1/fleet", "Connection refused"),
    ],
)
def test_a_bad_url_or_unreachable_database_is_one_clear_error(url: str, says: str) -> None:
    with pytest.raises(DatabaseError) as caught:
        open_database(url)
    message = str(caught.value)
    assert says in message and "\n" not in message and "secret" not in message


def test_a_missing_postgresql_database_is_one_clear_error(postgres: Postgres) -> None:
    with pytest.raises(DatabaseError, match='database "nothere" does not exist'):
        open_database(postgres.url.rsplit("/", 1)[0] + "/nothere")


def test_migrations_ship_inside_the_package() -> None:
    versions = {p.name for p in (MIGRATIONS / "versions").glob("*.py")}
    assert {"env.py", "__init__.py"} <= {p.name for p in MIGRATIONS.glob("*.py")}
    assert "0001_initial.py" in versions and "__init__.py" in versions


# -- pure rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "bucket"),
    [(0.0, 0.0), (59.999, 0.0), (60.0, 60.0), (1764500012.5, 1764499980.0), (-0.5, -60.0)],
)
def test_minute_bucket(ts: float, bucket: float) -> None:
    assert retention.minute_bucket(ts) == bucket


@pytest.mark.parametrize(
    ("now", "raw_days", "agg_days", "raw", "agg"),
    [
        (1_000_000.0, 7, 90, 1_000_000.0 - 7 * 86400, 1_000_000.0 - 90 * 86400),
        (86400.0, 0, 1, 86400.0, 0.0),
        (86400.0, 0.5, 0.5, 43200.0, 43200.0),
    ],
)
def test_cutoffs(now: float, raw_days: float, agg_days: float, raw: float, agg: float) -> None:
    assert retention.cutoffs(now, raw_days, agg_days) == retention.Cutoffs(raw=raw, agg=agg)


def test_negative_retention_is_refused() -> None:
    with pytest.raises(ValueError):
        retention.cutoffs(0.0, -1, 90)


@pytest.mark.parametrize(
    ("doc", "samples"),
    [
        ({"schema": 1, "seq": 3, "id": "x", "ts": 5.0, "cpu_pct": 2}, {"cpu_pct": 2.0}),
        ({"inference": {"fps": 9.5, "backend": "cpu"}}, {"inference.fps": 9.5}),
        ({"inference": None, "temp_c": None, "mqtt": {"connected": True}}, {}),
        ({"load": [1, 2], "x": math.nan, "y": math.inf, "z": "3"}, {}),
        (
            {"outbox": {"depth": 0, "nested": {"a": 1}}},
            {"outbox.depth": 0.0, "outbox.nested.a": 1.0},
        ),
    ],
)
def test_numeric_samples(doc: dict[str, Any], samples: dict[str, float]) -> None:
    assert retention.numeric_samples(doc) == samples


@pytest.mark.parametrize(
    ("doc", "fields"),
    [
        (
            {"state": "online", "groups": ["b", "a", "a"], "agent_version": "0.1.0"},
            retention.DeviceFields(groups=["a", "b"], agent_version="0.1.0", online=True),
        ),
        ({"state": "offline", "reason": "lost"}, retention.DeviceFields(online=False)),
        ({"state": 1, "groups": "door", "agent_version": 2}, retention.DeviceFields()),
        ({"groups": ["ok", 3]}, retention.DeviceFields(groups=["ok"])),
    ],
)
def test_status_fields(doc: dict[str, Any], fields: retention.DeviceFields) -> None:
    assert retention.status_fields(doc) == fields


@pytest.mark.parametrize(
    ("doc", "fields"),
    [
        ({"model": "colours", "version": 2}, retention.DeviceFields(model="colours", version=2)),
        ({"model": None, "version": True}, retention.DeviceFields()),
        ({"version": "2", "agent_version": "0.3"}, retention.DeviceFields(agent_version="0.3")),
    ],
)
def test_state_fields(doc: dict[str, Any], fields: retention.DeviceFields) -> None:
    assert retention.state_fields(doc) == fields
