"""Writes for many messages at once: the ingester stores a batch in one transaction
with a handful of statements, not several per message (on PostgreSQL each statement
is a round trip; bench/server_ingest.py).

- :func:`record_messages`: the keys of a batch in one ``INSERT … ON CONFLICT DO
  NOTHING RETURNING id``: the keys that come back are new, the others duplicates.
- :func:`store_telemetry`: the raw samples of every telemetry document in one
  multi-row INSERT, their minute aggregates folded first here (:func:`fold`, pure) and
  upserted in one statement, and each device's newest document on its row.

The SQL is written by hand: SQLAlchemy compiles a multi-row VALUES anew on every call
(its statement cache does not take them), which cost more than the round trips it
saved. SQLite (≥ 3.24) takes multi-row VALUES; PostgreSQL takes arrays through
``unnest``, a few parameters whatever the rows (psycopg parses a query of more than 50
parameters anew on every call). Rows are written in key
order, so instances sharing a database take row locks in the same order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.server.retention import minute_bucket
from agent.server.schema import devices

ROWS_PER_STATEMENT = 500  # rows of one multi-row statement (SQLite allows 32,766 values)


@dataclass(frozen=True)
class Key:
    """One message's row in ``messages``."""

    id: str
    device: str
    stream: str
    seq: int | None
    ts: float | None
    received: float


@dataclass(frozen=True)
class Telemetry:
    """One telemetry document to store."""

    device: str
    ts: float
    samples: Mapping[str, float]
    doc: Mapping[str, Any] | None  # the whole document: the device's latest telemetry


@dataclass
class Agg:
    min: float
    max: float
    sum: float
    count: int


def fold(docs: Sequence[Telemetry]) -> dict[tuple[str, str, float], Agg]:
    """The minute aggregates of ``docs``: per (device, metric, minute) min, max, sum and
    count. A multi-row upsert may not touch one row twice: this makes each key once."""
    out: dict[tuple[str, str, float], Agg] = {}
    for doc in docs:
        bucket = minute_bucket(doc.ts)
        for metric, value in doc.samples.items():
            agg = out.get((doc.device, metric, bucket))
            if agg is None:
                out[(doc.device, metric, bucket)] = Agg(value, value, value, 1)
            else:
                agg.min, agg.max = min(agg.min, value), max(agg.max, value)
                agg.sum += value
                agg.count += 1
    return out


def newest(docs: Sequence[Telemetry]) -> dict[str, Telemetry]:
    """Per device, its newest document with a ``doc`` (the later one on a tie)."""
    out: dict[str, Telemetry] = {}
    for doc in docs:
        if doc.doc is not None and (doc.device not in out or doc.ts >= out[doc.device].ts):
            out[doc.device] = doc
    return out


def record_messages(conn: sa.Connection, keys: Sequence[Key]) -> set[str]:
    """Record the keys; returns those that were not recorded before (concurrent inserts
    of one key from two connections store one row; the loser waits for the winner)."""
    new: set[str] = set()
    rows = sorted({k.id: k for k in keys}.values(), key=lambda k: k.id)
    if conn.dialect.name == "postgresql":
        arrays = {"i": [k.id for k in rows], "d": [k.device for k in rows],
                  "s": [k.stream for k in rows], "q": [k.seq for k in rows],
                  "t": [k.ts for k in rows], "r": [k.received for k in rows]}  # fmt: skip
        return set(conn.execute(_PG_MESSAGES, arrays).scalars())
    for chunk in _chunks(rows):
        params: dict[str, Any] = {}
        for i, k in enumerate(chunk):
            params.update({f"i{i}": k.id, f"d{i}": k.device, f"s{i}": k.stream,
                           f"q{i}": k.seq, f"t{i}": k.ts, f"r{i}": k.received})  # fmt: skip
        new.update(conn.execute(_messages_insert(len(chunk)), params).scalars())
    return new


def store_telemetry(conn: sa.Connection, docs: Sequence[Telemetry]) -> None:
    """Store ``docs``: raw samples, minute aggregates, and each device's newest document
    on its row unless the row holds a newer one (a replayed outbox sends old telemetry
    after new). A device without a row yet gets no row from its telemetry."""
    raw = [(d.device, d.ts, m, float(v)) for d in docs for m, v in d.samples.items()]
    aggs = sorted(fold(docs).items())
    if conn.dialect.name == "postgresql":
        _pg_telemetry(conn, raw, aggs)
        raw, aggs = [], []
    for chunk in _chunks(raw):
        params: dict[str, Any] = {}
        for i, (device, ts, metric, value) in enumerate(chunk):
            params.update({f"d{i}": device, f"t{i}": ts, f"m{i}": metric, f"v{i}": value})
        conn.execute(_raw_insert(len(chunk)), params)
    for chunk_ in _chunks(aggs):
        params = {}
        for i, ((device, metric, bucket), a) in enumerate(chunk_):
            params.update({f"d{i}": device, f"m{i}": metric, f"b{i}": bucket, f"lo{i}": a.min,
                           f"hi{i}": a.max, f"s{i}": a.sum, f"n{i}": a.count})  # fmt: skip
        conn.execute(_agg_upsert(conn.dialect.name, len(chunk_)), params)
    for device, doc in sorted(newest(docs).items()):
        conn.execute(
            sa.update(devices)
            .where(
                devices.c.id == device,
                sa.or_(devices.c.telemetry_ts.is_(None), devices.c.telemetry_ts <= doc.ts),
            )
            .values(telemetry=dict(doc.doc or {}), telemetry_ts=doc.ts)
        )


def _pg_telemetry(
    conn: sa.Connection,
    raw: list[tuple[str, float, str, float]],
    aggs: list[tuple[tuple[str, str, float], Agg]],
) -> None:
    """PostgreSQL: each as arrays through ``unnest``: four or seven parameters whatever
    the rows (psycopg parses a query with more than 50 parameters anew every time)."""
    if raw:
        device, ts, metric, value = (list(c) for c in zip(*raw, strict=True))
        conn.execute(_PG_RAW, {"d": device, "t": ts, "m": metric, "v": value})
    if aggs:
        conn.execute(
            _PG_AGG,
            {
                "d": [k[0] for k, _ in aggs],
                "m": [k[1] for k, _ in aggs],
                "b": [k[2] for k, _ in aggs],
                "lo": [a.min for _, a in aggs],
                "hi": [a.max for _, a in aggs],
                "s": [a.sum for _, a in aggs],
                "n": [a.count for _, a in aggs],
            },
        )


_PG_MESSAGES = sa.text(
    "INSERT INTO messages (id, device, stream, seq, ts, received) "
    "SELECT * FROM unnest(CAST(:i AS text[]), CAST(:d AS text[]), CAST(:s AS text[]), "
    "CAST(:q AS bigint[]), CAST(:t AS float8[]), CAST(:r AS float8[])) "
    "ON CONFLICT (id) DO NOTHING RETURNING id"
)
_PG_RAW = sa.text(
    "INSERT INTO telemetry_raw (device, ts, metric, value) "
    "SELECT * FROM unnest(CAST(:d AS text[]), CAST(:t AS float8[]), CAST(:m AS text[]), "
    "CAST(:v AS float8[]))"
)
_PG_AGG = sa.text(
    'INSERT INTO telemetry_agg (device, metric, bucket, "min", "max", "sum", "count") '
    "SELECT * FROM unnest(CAST(:d AS text[]), CAST(:m AS text[]), CAST(:b AS float8[]), "
    "CAST(:lo AS float8[]), CAST(:hi AS float8[]), CAST(:s AS float8[]), "
    "CAST(:n AS integer[])) "
    "ON CONFLICT (device, metric, bucket) DO UPDATE SET "
    '"min" = least(telemetry_agg."min", excluded."min"), '
    '"max" = greatest(telemetry_agg."max", excluded."max"), '
    '"sum" = telemetry_agg."sum" + excluded."sum", '
    '"count" = telemetry_agg."count" + excluded."count"'
)


def _chunks(rows: Sequence[Any]) -> list[Sequence[Any]]:
    return [rows[i : i + ROWS_PER_STATEMENT] for i in range(0, len(rows), ROWS_PER_STATEMENT)]


@functools.lru_cache(maxsize=256)
def _messages_insert(rows: int) -> sa.TextClause:
    values = ", ".join(f"(:i{i}, :d{i}, :s{i}, :q{i}, :t{i}, :r{i})" for i in range(rows))
    return sa.text(
        f"INSERT INTO messages (id, device, stream, seq, ts, received) VALUES {values} "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


@functools.lru_cache(maxsize=256)
def _raw_insert(rows: int) -> sa.TextClause:
    values = ", ".join(f"(:d{i}, :t{i}, :m{i}, :v{i})" for i in range(rows))
    return sa.text(f"INSERT INTO telemetry_raw (device, ts, metric, value) VALUES {values}")


@functools.lru_cache(maxsize=256)
def _agg_upsert(dialect: str, rows: int) -> sa.TextClause:
    least, greatest = ("least", "greatest") if dialect == "postgresql" else ("min", "max")
    values = ", ".join(f"(:d{i}, :m{i}, :b{i}, :lo{i}, :hi{i}, :s{i}, :n{i})" for i in range(rows))
    return sa.text(
        'INSERT INTO telemetry_agg (device, metric, bucket, "min", "max", "sum", "count") '
        f"VALUES {values} ON CONFLICT (device, metric, bucket) DO UPDATE SET "
        f'"min" = {least}(telemetry_agg."min", excluded."min"), '
        f'"max" = {greatest}(telemetry_agg."max", excluded."max"), '
        '"sum" = telemetry_agg."sum" + excluded."sum", '
        '"count" = telemetry_agg."count" + excluded."count"'
    )
