"""The SQLite outbox: every message the device records, numbered and kept until acknowledged.

A message is *recorded* when the transaction that numbers it commits. From then on it
survives an agent restart and a power cut (WAL with ``synchronous=FULL``), and it leaves
the outbox only when the broker has acknowledged it (:meth:`Outbox.write` with its row
id in ``acked``) or when the size cap pushes it out, oldest first, counted in
``dropped``.

Each message gets, inside that transaction, the next ``seq`` of its stream (one counter
per device and topic: ``telemetry``, ``events``, …, starting at 1 and never reused, also
across restarts) and a random ``id``. A consumer sees a gap in ``seq`` as a lost message
and a repeated ``id`` as a duplicate. Messages that are only sent, never kept (QoS 0
results, the online status, command replies) are numbered the same way but not stored.

Writes come in batches (one transaction for many messages and acknowledgements), so the
fsync per commit is shared. The class is thread-safe: one connection behind a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import EdgeAgentError
from agent.strictjson import finite

log = logging.getLogger(__name__)

SCHEMA = 1
_OVERHEAD = 48  # bytes a row costs beyond its topic and payload, roughly (SQLite record + index)

_DDL = """
CREATE TABLE IF NOT EXISTS messages (
    rowid   INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    size    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class OutboxError(EdgeAgentError):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True)
class Record:
    """A message to number, and to keep when ``keep`` (QoS 1 telemetry, events, …)."""

    stream: str  # the seq counter: the topic's last part (telemetry, events, results, …)
    topic: str
    body: dict[str, Any]  # the payload without the envelope; must carry "ts"
    qos: int = 1
    retain: bool = False
    keep: bool = True
    properties: dict[str, Any] = field(default_factory=dict)  # MQTT 5 properties (direct only)


@dataclass(frozen=True)
class Message:
    """A numbered message: stored ones have a ``rowid``, direct ones have ``rowid`` 0."""

    rowid: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # messages waiting for an acknowledgement
    bytes: int
    dropped: int  # pushed out by the size cap, since the outbox was created

    def to_dict(self) -> dict[str, int]:
        return {"depth": self.depth, "bytes": self.bytes, "dropped": self.dropped}


# Strict JSON: finite() turns NaN and infinities into null first (a model's NaN output).
_encode = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def envelope(record: Record, seq: int) -> bytes:
    """The JSON payload of ``record``: ``schema``, ``seq``, ``id`` (96 random bits, hex),
    then its body, which carries ``ts``. Strict JSON: a non-finite float becomes null.

    The envelope's fields always win: a body with its own ``id`` (or ``seq``) cannot
    make two messages look alike to a consumer that drops duplicates by ``id``.
    """
    head = {"schema": SCHEMA, "seq": seq, "id": os.urandom(12).hex()}
    doc = {**head, **record.body, **head}  # the head's order, the head's values
    return _encode(finite(doc)).encode()


class Outbox:
    """A store-and-forward queue in one SQLite file, capped at ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = self._open(path)
        self._seq: dict[str, int] = {}
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            if name.startswith("seq:"):
                self._seq[name[4:]] = value
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
        ).fetchone()
        self._depth, self._bytes = int(count), int(size)
        # Row ids are handed out here (one writer), so a batch is one executemany.
        # AUTOINCREMENT's sqlite_sequence keeps them rising even after the table empties.
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
            " COALESCE((SELECT MAX(rowid) FROM messages), 0))"
        ).fetchone()
        self._next_rowid = int(row[0]) + 1

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        """Open (or create) the outbox; a file that is not a database is moved aside."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"{path}: cannot create the outbox folder: {exc}") from exc
        for attempt in range(2):
            db = None
            try:
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit survives power loss
                db.executescript(_DDL)
                db.execute("SELECT COUNT(*) FROM messages").fetchone()
                return db
            except (
                sqlite3.OperationalError
            ) as exc:  # locked, read-only, cannot open: not ours to fix
                if db is not None:
                    db.close()
                raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
            except sqlite3.DatabaseError as exc:  # not a database, or malformed
                if db is not None:
                    db.close()
                if attempt:
                    raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                log.error(
                    "%s: not a usable outbox (%s); moved to %s, starting empty", path, exc, aside
                )
                for suffix in ("", "-wal", "-shm"):
                    part = Path(f"{path}{suffix}")
                    if part.exists():
                        os.replace(part, Path(f"{aside}{suffix}"))
            except OSError as exc:
                raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        raise AssertionError("unreachable")

    def write(
        self, records: Sequence[Record], acked: Iterable[int] = ()
    ) -> tuple[list[Message], int]:
        """Number ``records``, keep the kept ones and delete ``acked`` rows, in one commit.

        Returns the numbered messages in order (kept ones with their row id) and how many
        old messages the size cap dropped. Raises OutboxError when the write fails; then
        nothing of this batch is recorded.
        """
        acked = list(acked)
        out: list[Message] = []
        rows = []
        with self._lock:
            seq = dict(self._seq)
            next_rowid = self._next_rowid
            for record in records:  # numbered and encoded before the transaction opens
                n = seq.get(record.stream, 0) + 1
                try:
                    payload = envelope(record, n)
                except (TypeError, ValueError) as exc:  # a body JSON cannot carry: a bug
                    log.error("%s: cannot encode a %s message: %s", self.path, record.stream, exc)
                    continue
                seq[record.stream] = n
                rowid = 0
                if record.keep:
                    rowid, next_rowid = next_rowid, next_rowid + 1
                    size = len(payload) + len(record.topic) + _OVERHEAD
                    rows.append((rowid, record.topic, payload, record.qos, record.retain, size))
                out.append(
                    Message(
                        rowid, record.topic, payload, record.qos, record.retain, record.properties
                    )
                )
            try:
                self._db.execute("BEGIN IMMEDIATE")
                freed_n, freed_b = self._delete(acked)
                self._db.executemany(
                    "INSERT INTO messages (rowid, topic, payload, qos, retain, size) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                added_n, added_b = len(rows), sum(row[-1] for row in rows)
                self._db.executemany(
                    "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                    [(f"seq:{k}", v) for k, v in seq.items() if v != self._seq.get(k)],
                )
                depth = self._depth - freed_n + added_n
                size_now = self._bytes - freed_b + added_b
                dropped_n, dropped_b = self._enforce_cap(size_now)
                if dropped_n:
                    self._db.execute(
                        "INSERT OR REPLACE INTO counters (name, value) VALUES ('dropped', ?)",
                        (self._dropped + dropped_n,),
                    )
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise OutboxError(f"{self.path}: outbox write failed: {exc}") from exc
                raise
            self._seq = seq
            self._next_rowid = next_rowid
            self._depth = depth - dropped_n
            self._bytes = size_now - dropped_b
            self._dropped += dropped_n
        return out, dropped_n

    def _delete(self, rowids: list[int]) -> tuple[int, int]:
        if not rowids:
            return 0, 0
        n = size = 0
        for start in range(0, len(rowids), 500):
            chunk = rowids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE rowid IN ({marks})",
                chunk,
            ).fetchone()
            self._db.execute(f"DELETE FROM messages WHERE rowid IN ({marks})", chunk)
            n, size = n + int(row[0]), size + int(row[1])
        return n, size

    def _enforce_cap(self, size_now: int) -> tuple[int, int]:
        """Delete the oldest rows until the outbox fits ``max_bytes``; (rows, bytes) dropped."""
        excess = size_now - self.max_bytes
        if excess <= 0:
            return 0, 0
        n = freed = 0
        last = 0
        for rowid, size in self._db.execute("SELECT rowid, size FROM messages ORDER BY rowid"):
            last = rowid
            n += 1
            freed += size
            if freed >= excess:
                break
        self._db.execute("DELETE FROM messages WHERE rowid <= ?", (last,))
        return n, freed

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def pending(self, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` kept messages with a row id above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, topic, payload, qos, retain FROM messages WHERE rowid > ? "
                "ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(self._depth, self._bytes, self._dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()
