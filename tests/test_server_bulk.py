"""Writes of a whole batch (agent/server/bulk.py): the pure folding by table, then the
statements on both databases: the same rows as one write per message would give."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from agent.server.bulk import Agg, Key, Telemetry, fold, newest, record_messages, store_telemetry
from agent.server.db import open_database
from agent.server.schema import devices, messages, telemetry_agg, telemetry_raw
from agent.server.store import upsert_device


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        ([], {}),
        (
            [Telemetry("a", 60.0, {"fps": 2.0}, None)],
            {("a", "fps", 60.0): Agg(2.0, 2.0, 2.0, 1)},
        ),
        (  # one minute, one device: folded into one row (a multi-row upsert needs it)
            [Telemetry("a", 61.0, {"fps": 2.0}, None), Telemetry("a", 119.9, {"fps": 5.0}, None)],
            {("a", "fps", 60.0): Agg(2.0, 5.0, 7.0, 2)},
        ),
        (  # another minute, another device, another metric: their own rows
            [
                Telemetry("a", 61.0, {"fps": 2.0, "cpu_pct": 9.0}, None),
                Telemetry("a", 120.0, {"fps": 4.0}, None),
                Telemetry("b", 61.0, {"fps": -1.0}, None),
            ],
            {
                ("a", "fps", 60.0): Agg(2.0, 2.0, 2.0, 1),
                ("a", "cpu_pct", 60.0): Agg(9.0, 9.0, 9.0, 1),
                ("a", "fps", 120.0): Agg(4.0, 4.0, 4.0, 1),
                ("b", "fps", 60.0): Agg(-1.0, -1.0, -1.0, 1),
            },
        ),
    ],
)
def test_fold_makes_one_aggregate_per_device_metric_and_minute(
    docs: list[Telemetry], expected: dict[tuple[str, str, float], Agg]
) -> None:
    assert fold(docs) == expected


def test_newest_is_each_devices_latest_document_a_tie_to_the_later() -> None:
    docs = [
        Telemetry("a", 5.0, {}, {"n": 1}),
        Telemetry("a", 3.0, {}, {"n": 2}),  # an outbox replaying: older, after
        Telemetry("b", 1.0, {}, {"n": 3}),
        Telemetry("b", 1.0, {}, {"n": 4}),
        Telemetry("c", 9.0, {}, None),  # no document: nothing to set
    ]
    got = {d: t.doc for d, t in newest(docs).items()}
    assert got == {"a": {"n": 1}, "b": {"n": 4}}


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = open_database(db_url)
    yield engine
    engine.dispose()


def test_a_batch_of_keys_says_which_are_new(engine: sa.Engine) -> None:
    def key(i: str) -> Key:
        return Key(i, "cam-1", "events", 1, 10.0, 11.0)

    with engine.begin() as conn:
        assert record_messages(conn, [key("a"), key("b"), key("a")]) == {"a", "b"}
    with engine.begin() as conn:
        assert record_messages(conn, [key("b"), key("c")]) == {"c"}
        assert record_messages(conn, []) == set()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages.c.id, messages.c.seq, messages.c.ts)).all()
    assert sorted(rows) == [("a", 1, 10.0), ("b", 1, 10.0), ("c", 1, 10.0)]


def test_a_batch_of_telemetry_stores_what_one_write_per_document_would(
    engine: sa.Engine,
) -> None:
    with engine.begin() as conn:
        upsert_device(conn, "a", 1.0, status={"state": "online", "groups": []})
        store_telemetry(
            conn,
            [
                Telemetry("a", 61.0, {"fps": 2.0, "cpu_pct": 10.0}, {"ts": 61.0}),
                Telemetry("a", 90.0, {"fps": 6.0}, {"ts": 90.0}),
                Telemetry("b", 62.0, {"fps": 1.0}, {"ts": 62.0}),  # no row: no latest
            ],
        )
    with engine.begin() as conn:  # a later batch folds into the same minute
        store_telemetry(conn, [Telemetry("a", 100.0, {"fps": 1.0}, {"ts": 80.0})])
        store_telemetry(conn, [Telemetry("a", 70.0, {"fps": 3.0}, {"ts": 70.0})])  # older
        store_telemetry(conn, [])
    with engine.connect() as conn:
        agg = conn.execute(
            sa.select(
                telemetry_agg.c.device,
                telemetry_agg.c.metric,
                telemetry_agg.c.bucket,
                telemetry_agg.c.min,
                telemetry_agg.c.max,
                telemetry_agg.c.sum,
                telemetry_agg.c.count,
            ).order_by(telemetry_agg.c.device, telemetry_agg.c.metric)
        ).all()
        raw = conn.execute(sa.select(sa.func.count()).select_from(telemetry_raw)).scalar_one()
        latest = conn.execute(sa.select(devices.c.telemetry, devices.c.telemetry_ts)).one()
    assert [tuple(r) for r in agg] == [
        ("a", "cpu_pct", 60.0, 10.0, 10.0, 10.0, 1),
        ("a", "fps", 60.0, 1.0, 6.0, 12.0, 4),
        ("b", "fps", 60.0, 1.0, 1.0, 1.0, 1),
    ]
    assert raw == 6
    assert tuple(latest) == ({"ts": 80.0}, 100.0)
