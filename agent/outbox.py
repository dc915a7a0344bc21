"""The SQLite outbox: every message the device records, numbered and kept until acknowledged.

A message is *recorded* when the transaction that numbers it commits. From then on it
survives an agent restart and a power cut (WAL with ``synchronous=FULL``), and it leaves
the outbox only when the broker has acknowledged it (:meth:`Outbox.write` with its row
id in ``acked``) or when the size cap pushes it out, counted in ``dropped``. The cap
drops by stream, in ``DROP_ORDER``: results first, then telemetry, then events, the
retained state last; oldest first within a stream.

Each message gets, inside that transaction, the next ``seq`` of its stream (one counter
per device and topic: ``telemetry``, ``events``, …, starting at 1 and never reused, also
across restarts) and a random ``id``. A consumer sees a gap in ``seq`` as a lost message
and a repeated ``id`` as a duplicate. Messages that are only sent, never kept (QoS 0
results, the online status, command replies) are numbered the same way but not stored.

``seq`` never goes back, even when the outbox file is lost: ``<outbox>.seq`` (the
high-water mark, replaced atomically) holds for each stream a number its counter has
not reached; it is rewritten, ``SEQ_BLOCK`` ahead, before a counter passes it.

Opening checks the file (``PRAGMA quick_check``, the tables' shape, every row's types).
A damaged outbox (truncated, garbled, wrong-typed rows or counters) never stops the
agent: it is moved aside to ``<outbox>.damaged-<time>``, a new one is started with the
messages and counters that could be read, the other counters continue from the
high-water mark (else from the clock in milliseconds, certainly higher than any count),
and :attr:`Outbox.repair` says what happened and how many messages were lost.

Writes come in batches (one transaction for many messages and acknowledgements), so the
fsync per commit is shared. The class is thread-safe: one connection behind a lock.
One process at a time: :meth:`Outbox.open` holds ``<outbox>.lock`` until :meth:`close`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.atomic import fsync_dir, read_bounded, write_atomic
from agent.errors import EdgeAgentError
from agent.locks import HolderLock
from agent.repairs import Repair
from agent.strictjson import finite

log = logging.getLogger(__name__)

SCHEMA = 1
FORMAT = 2  # PRAGMA user_version of the file: 0 (before streams and priorities), 2
_OVERHEAD = 48  # bytes a row costs beyond its topic and payload, roughly (SQLite record + index)
KEEP_DAMAGED = 3  # damaged outbox files kept aside, the newest
SEQ_BLOCK = 10_000  # the high-water mark runs this far ahead of the counters
# The largest message sent: the shipped broker's max_packet_size (a client sending more
# is disconnected, and would send it again on every reconnect) and the fleet's limit of
# one report, less room for the packet's header and properties.
MAX_MESSAGE = 256 * 1024
_PACKET_ROOM = 512
OVERSIZE_LOG_S = 60.0  # a stream's messages over MAX_MESSAGE: one log line this often
_MAX_COUNT = 2**62  # a counter at or above this is damage (seq + 1 must stay an SQLite int)

# The size cap drops the lowest first: results, telemetry (and any other stream), events,
# then the retained state.
DROP_ORDER: Mapping[str, int] = {"results": 0, "telemetry": 1, "events": 2, "state": 3}
_DROP_DEFAULT = 1

_DDL = """
CREATE TABLE IF NOT EXISTS messages (
    rowid   INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    stream  TEXT    NOT NULL DEFAULT '',
    prio    INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_drop ON messages (prio, rowid);
"""
_COLUMNS = {
    "messages": ("rowid", "topic", "payload", "qos", "retain", "size", "stream", "prio"),
    "counters": ("name", "value"),
}
# Rows whose values are not what the outbox writes: any one of them is damage.
_BAD_ROWS = {
    "messages": "typeof(topic) != 'text' OR typeof(payload) NOT IN ('blob', 'text') "
    "OR typeof(qos) != 'integer' OR qos NOT IN (0, 1) OR typeof(retain) != 'integer' "
    "OR retain NOT IN (0, 1) OR typeof(size) != 'integer' OR size < 0 "
    "OR typeof(stream) != 'text' OR typeof(prio) != 'integer'",
    "counters": f"typeof(name) != 'text' OR typeof(value) != 'integer' OR value < 0 "
    f"OR value >= {_MAX_COUNT}",
    "sqlite_sequence": f"typeof(seq) != 'integer' OR seq < 0 OR seq >= {_MAX_COUNT}",
}
# SQLite result codes that say the file is damaged (vs. the disk or the permissions):
# SQLITE_ERROR (a schema that is not ours), CORRUPT, FORMAT, MISMATCH, NOTADB.
_DAMAGE_CODES = {1, 11, 20, 24, 26}


class OutboxError(EdgeAgentError):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True)
class Replaced:
    """What opening did about a damaged outbox file (the ``state_repaired`` event)."""

    file: Path
    problem: str  # what was wrong, one line
    kept_as: Path  # the damaged file, moved aside
    lost: int | None  # messages that could not be carried over; None: unknown
    seq_from: Literal["counters", "high-water mark", "clock"]  # where seq continues from

    def to_event(self) -> dict[str, Any]:
        count = "an unknown number of" if self.lost is None else str(self.lost)
        action = (
            f"replaced; the damaged file is kept as {self.kept_as.name}; {count} message(s) "
            f"lost; seq continues from the {self.seq_from}"
        )
        lost: int | Literal["unknown"] = "unknown" if self.lost is None else self.lost
        return Repair(str(self.file), self.problem, action, str(self.kept_as), lost).to_event()


def drop_rank(stream: str) -> int:
    """Where ``stream`` comes in the cap's drop order (lower: dropped sooner)."""
    return DROP_ORDER.get(stream, _DROP_DEFAULT)


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
        """No I/O: :meth:`open` takes the file."""
        self.path = path
        self.max_bytes = max_bytes
        self.repair: Replaced | None = None  # set by open() when it replaced a damaged file
        self._lock = threading.Lock()
        self._file_lock = HolderLock(
            Path(f"{path}.lock"), f"the outbox {path}", "agent", OutboxError
        )
        self._highwater = _HighWater(Path(f"{path}.seq"))
        self._conn: sqlite3.Connection | None = None
        self._seq: dict[str, int] = {}
        self._floor = 0  # streams without a counter count on from here
        self._reserved: dict[str, int] = {}  # the high-water mark on disk
        self._dropped = 0
        self._depth = self._bytes = 0
        self._next_rowid = 1
        self._oversize: dict[str, tuple[float, int]] = {}  # stream -> (logged at, not logged)

    # -- opening ------------------------------------------------------------------------

    def open(self) -> Outbox:
        """Take ``<outbox>.lock``, open the file and check it; a damaged one is replaced
        (see :attr:`repair`).

        Raises OutboxError when another agent uses this outbox, or the file cannot be
        opened or written at all (a folder that cannot be created, a read-only disk).
        """
        if self._conn is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create the outbox folder: {exc}") from exc
        self._file_lock.acquire()
        try:
            self._conn, self.repair = self._open_checked()
            self._load()
        except BaseException:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._file_lock.release()
            raise
        if self.repair is not None:
            log.error("%s: %s", self.path, self.repair.to_event()["action"])
        return self

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from exc

    def _open_checked(self) -> tuple[sqlite3.Connection, Replaced | None]:
        try:
            empty = self.path.stat().st_size == 0  # never a file the outbox wrote
        except FileNotFoundError:
            empty = False
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from exc
        db = self._connect()
        try:
            problem: str | None
            if empty:
                problem, intact = "the file is empty (truncated)", False
            else:
                problem, intact = _inspect(db)
            if problem is None:
                if _prepare(db):
                    self._seed(db)
                return db, None
            return self._replace(db, problem, intact)
        except sqlite3.Error as exc:  # the disk or the permissions, not the file's content
            db.close()
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from exc
        except OSError as exc:
            db.close()
            raise OutboxError(f"{self.path}: cannot replace the damaged outbox: {exc}") from exc

    def _seed(self, db: sqlite3.Connection) -> None:
        """A new file: counters continue from the high-water mark of a previous one."""
        mark = self._highwater.load()
        if mark:
            log.warning(
                "%s: a new outbox; seq continues from the high-water mark in %s",
                self.path,
                self._highwater.path,
            )
            db.executemany(
                "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                [(f"seq:{stream}", value) for stream, value in mark.items()],
            )

    def _replace(
        self, db: sqlite3.Connection, problem: str, intact: bool
    ) -> tuple[sqlite3.Connection, Replaced]:
        """Move the damaged file aside; start a new one with what could be read of it."""
        found = _salvage(db, intact)
        db.close()
        seq, floor = dict(found.seq), found.floor
        seq_from: Literal["counters", "high-water mark", "clock"] = "counters"
        if not found.complete:
            mark = self._highwater.load()
            if mark is not None:
                seq_from = "high-water mark"
                for stream, value in mark.items():
                    seq.setdefault(stream, value)
                floor = max(floor, *mark.values(), 0)
            else:  # no better floor: the clock in ms is above any count this device made
                seq_from = "clock"
                floor = max(floor, time.time_ns() // 1_000_000)
        kept_as = self._move_aside()
        fresh = self._connect()
        try:
            _configure(fresh)
            _prepare(fresh)
            rows = []
            for rowid, (topic, payload, qos, retain) in enumerate(found.rows, start=1):
                stream = topic.rsplit("/", 1)[-1]
                size = len(payload) + len(topic) + _OVERHEAD
                rows.append((rowid, topic, payload, qos, retain, size, stream, drop_rank(stream)))
            counters = [(f"seq:{stream}", value) for stream, value in seq.items()]
            counters += [("dropped", found.dropped), ("floor", floor)]
            fresh.execute("BEGIN IMMEDIATE")
            fresh.executemany(
                "INSERT INTO messages (rowid, topic, payload, qos, retain, size, stream, prio) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            fresh.executemany(
                "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", counters
            )
            fresh.execute("COMMIT")
        except BaseException:
            fresh.close()
            raise
        lost = None if found.total is None else max(0, found.total - len(rows))
        return fresh, Replaced(self.path, problem, kept_as, lost, seq_from)

    def _move_aside(self) -> Path:
        stamp = int(time.time())
        kept_as = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while kept_as.exists():
            n += 1
            kept_as = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                os.replace(part, Path(f"{kept_as}{suffix}"))
        # A failing card may damage it at every boot: keep the newest few, not the disk full.
        older = sorted(
            p
            for p in self.path.parent.glob(f"{self.path.name}.damaged-*")
            if not p.name.endswith(("-wal", "-shm"))
        )
        for old in older[:-KEEP_DAMAGED]:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{old}{suffix}").unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        return kept_as

    def _load(self) -> None:
        """Read the counters and figures of a checked file; cover them by the high-water mark."""
        db = self._db
        for name, value in db.execute("SELECT name, value FROM counters"):
            if name.startswith("seq:"):
                self._seq[name[4:]] = value
            elif name == "dropped":
                self._dropped = value
            elif name == "floor":
                self._floor = value
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        self._depth, self._bytes = int(count), int(size)
        # Row ids are handed out here (one writer), so a batch is one executemany.
        # AUTOINCREMENT's sqlite_sequence keeps them rising even after the table empties.
        row = db.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
            " COALESCE((SELECT MAX(rowid) FROM messages), 0))"
        ).fetchone()
        self._next_rowid = int(row[0]) + 1
        self._reserved = self._highwater.load() or {}
        self._reserve(self._seq)

    def _reserve(self, seq: Mapping[str, int]) -> None:
        """Move the high-water mark ahead of ``seq`` before any such seq is committed."""
        behind = {s: n + SEQ_BLOCK for s, n in seq.items() if n > self._reserved.get(s, 0)}
        if not behind:
            return
        mark = {**self._reserved, **behind}
        try:
            self._highwater.save(mark)
        except OSError as exc:
            raise OutboxError(f"{self._highwater.path}: cannot write: {exc}") from exc
        self._reserved = mark

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"{self.path}: the outbox is not open")
        return self._conn

    # -- writing ------------------------------------------------------------------------

    def write(
        self, records: Sequence[Record], acked: Iterable[int] = ()
    ) -> tuple[list[Message], dict[str, int]]:
        """Number ``records``, keep the kept ones and delete ``acked`` rows, in one commit.

        Returns the numbered messages in order (kept ones with their row id) and how many
        old messages the size cap dropped, by stream. Raises OutboxError when the write
        fails; then nothing of this batch is recorded.
        """
        acked = list(acked)
        out: list[Message] = []
        rows = []
        with self._lock:
            db = self._db
            seq = dict(self._seq)
            next_rowid = self._next_rowid
            for record in records:  # numbered and encoded before the transaction opens
                n = seq.get(record.stream, self._floor) + 1
                try:
                    payload = envelope(record, n)
                except (TypeError, ValueError) as exc:  # a body JSON cannot carry: a bug
                    log.error("%s: cannot encode a %s message: %s", self.path, record.stream, exc)
                    continue
                if len(payload) + len(record.topic.encode()) + _PACKET_ROOM > MAX_MESSAGE:
                    self._too_large(record.stream, len(payload))  # kept, it would stall the link
                    continue
                seq[record.stream] = n
                rowid = 0
                if record.keep:
                    rowid, next_rowid = next_rowid, next_rowid + 1
                    size = len(payload) + len(record.topic) + _OVERHEAD
                    rows.append(
                        (
                            rowid,
                            record.topic,
                            payload,
                            record.qos,
                            record.retain,
                            size,
                            record.stream,
                            drop_rank(record.stream),
                        )
                    )
                out.append(
                    Message(
                        rowid, record.topic, payload, record.qos, record.retain, record.properties
                    )
                )
            self._reserve(seq)
            try:
                db.execute("BEGIN IMMEDIATE")
                freed_n, freed_b = self._delete(acked)
                db.executemany(
                    "INSERT INTO messages (rowid, topic, payload, qos, retain, size, stream, prio)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                added_n, added_b = len(rows), sum(row[5] for row in rows)
                db.executemany(
                    "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                    [(f"seq:{k}", v) for k, v in seq.items() if v != self._seq.get(k)],
                )
                depth = self._depth - freed_n + added_n
                size_now = self._bytes - freed_b + added_b
                dropped, dropped_b = self._enforce_cap(size_now)
                dropped_n = sum(dropped.values())
                if dropped_n:
                    db.execute(
                        "INSERT OR REPLACE INTO counters (name, value) VALUES ('dropped', ?)",
                        (self._dropped + dropped_n,),
                    )
                db.execute("COMMIT")
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
        return out, dropped

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

    def _enforce_cap(self, size_now: int) -> tuple[dict[str, int], int]:
        """Delete rows in ``DROP_ORDER``, oldest first within a rank, until the outbox
        fits ``max_bytes``; returns the rows dropped by stream, and the bytes freed."""
        excess = size_now - self.max_bytes
        if excess <= 0:
            return {}, 0
        dropped: collections.Counter[str] = collections.Counter()
        freed = 0
        last = (0, 0)
        for rowid, size, stream, prio in self._db.execute(
            "SELECT rowid, size, stream, prio FROM messages ORDER BY prio, rowid"
        ):
            last = (prio, rowid)
            dropped[stream] += 1
            freed += size
            if freed >= excess:
                break
        prio, rowid = last
        self._db.execute(
            "DELETE FROM messages WHERE prio < ? OR (prio = ? AND rowid <= ?)", (prio, prio, rowid)
        )
        return dict(dropped), freed

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    # -- reading ------------------------------------------------------------------------

    def _too_large(self, stream: str, size: int) -> None:
        """Log a message over MAX_MESSAGE, left out: at most once per OVERSIZE_LOG_S and
        stream (results come at the frame rate), with how many were left out since."""
        now = time.monotonic()
        logged_at, since = self._oversize.get(stream, (-OVERSIZE_LOG_S, 0))
        if now - logged_at < OVERSIZE_LOG_S:
            self._oversize[stream] = (logged_at, since + 1)
            return
        self._oversize[stream] = (now, 0)
        log.error(
            "%s: a %s message of %d bytes is over the %d-byte limit: not sent (%d more "
            "since the last such line)",
            self.path,
            stream,
            size,
            MAX_MESSAGE,
            since,
        )

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
        """Close the file and let go of ``<outbox>.lock`` (a no-op when not open)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._file_lock.release()


# -- checking and repairing a file ----------------------------------------------------------


def _configure(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit survives power loss


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is about the file's content (vs. the disk, locks or permissions)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.OperationalError
        )
    return code & 0xFF in _DAMAGE_CODES


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_COUNT


def _inspect(db: sqlite3.Connection) -> tuple[str | None, bool]:
    """What is wrong with the file, if anything, and whether its pages are intact.

    Raises sqlite3.Error for failures that are not the file's fault (I/O, permissions).
    """
    try:
        _configure(db)
        check = db.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            first = str(check[0][0]) if check else "no answer"
            return f"integrity check failed: {first[:200]}", False
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if not tables & set(_COLUMNS):
            return None, True  # a new file: the tables are made next
        for table, want in _COLUMNS.items():
            if table not in tables:
                return f"table {table} is missing", True
            info = db.execute(f"PRAGMA table_info({table})").fetchall()
            have = tuple(row[1] for row in info)
            if have != want and not (table == "messages" and have == want[:-2]):  # format 0
                return f"table {table} has columns {', '.join(have)}", True
            if table == "messages" and (str(info[0][2]).upper(), info[0][5]) != ("INTEGER", 1):
                return "table messages has no integer row ids", True
        bad = dict(_BAD_ROWS)
        if "stream" not in _columns(db, "messages"):
            bad["messages"] = bad["messages"].rsplit(" OR typeof(stream)", 1)[0]
        if "sqlite_sequence" not in tables:
            del bad["sqlite_sequence"]
        for table, where in bad.items():
            row = db.execute(f"SELECT * FROM {table} WHERE {where} LIMIT 1").fetchone()
            if row is not None:
                (count,) = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()
                example = f"row {row[0]}" if table == "messages" else _show(row)
                return f"{count} row(s) of table {table} of the wrong type, e.g. {example}", True
    except sqlite3.Error as exc:
        if _is_damage(exc):
            return f"not a usable outbox: {exc}", False
        raise
    return None, True


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _show(row: tuple[Any, ...]) -> str:
    """A damaged row, short: long values (payloads) cut."""
    parts = [repr(v if not isinstance(v, bytes | str) or len(v) <= 40 else v[:40]) for v in row]
    return "(" + ", ".join(parts) + ")"


def _prepare(db: sqlite3.Connection) -> bool:
    """Make the tables (returns True when the file had none) and bring a format 0 file
    to format 2: every row gets its stream and drop rank."""
    fresh = "messages" not in {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    if not fresh and "stream" not in _columns(db, "messages"):
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE messages ADD COLUMN stream TEXT NOT NULL DEFAULT ''")
        db.execute(f"ALTER TABLE messages ADD COLUMN prio INTEGER NOT NULL DEFAULT {_DROP_DEFAULT}")
        updates = []
        for rowid, topic in db.execute("SELECT rowid, topic FROM messages").fetchall():
            stream = topic.rsplit("/", 1)[-1]
            updates.append((stream, drop_rank(stream), rowid))
        db.executemany("UPDATE messages SET stream = ?, prio = ? WHERE rowid = ?", updates)
        db.execute("COMMIT")
    db.executescript(_DDL)
    db.execute(f"PRAGMA user_version = {FORMAT}")
    return fresh


@dataclass
class _Salvage:
    """What could be read from a damaged file."""

    seq: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    floor: int = 0
    complete: bool = False  # every counter was read
    rows: list[tuple[str, bytes, int, int]] = field(default_factory=list)
    total: int | None = None  # messages in the file; None: could not be counted


def _salvage(db: sqlite3.Connection, intact: bool) -> _Salvage:
    """The counters and well-typed messages of a file whose pages are ``intact``; of a
    file that is not, only how many messages it held (if that can be read)."""
    found = _Salvage()
    with contextlib.suppress(sqlite3.Error):
        found.total = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    if not intact:
        return found
    found.complete = True
    try:
        for name, value in db.execute("SELECT name, value FROM counters"):
            if not isinstance(name, str) or not _is_count(value):
                if not (isinstance(name, str) and name in ("dropped", "floor")):
                    found.complete = False  # a seq counter that cannot be read
            elif name.startswith("seq:"):
                found.seq[name[4:]] = value
            elif name == "dropped":
                found.dropped = value
            elif name == "floor":
                found.floor = value
    except sqlite3.Error:
        found.complete = False
    with contextlib.suppress(sqlite3.Error):
        for _, topic, payload, qos, retain in db.execute(
            "SELECT rowid, topic, payload, qos, retain FROM messages ORDER BY rowid"
        ):
            if isinstance(payload, str):
                payload = payload.encode()
            if (
                isinstance(topic, str)
                and isinstance(payload, bytes)
                and type(qos) is int
                and qos in (0, 1)
                and type(retain) is int
                and retain in (0, 1)
            ):
                found.rows.append((topic, payload, qos, retain))
    return found


class _HighWater:
    """``<outbox>.seq``: for each stream, a number its ``seq`` has not reached yet."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, int] | None:
        """The marks, or None when the file is absent or unreadable (never raises)."""
        try:
            raw = read_bounded(self.path, 1_000_000)  # never a link, FIFO or device
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read: %s; it is rewritten", self.path, exc)
            self._set_aside()
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        marks = doc.get("seq") if isinstance(doc, dict) else None
        if not isinstance(marks, dict) or not all(
            isinstance(k, str) and _is_count(v) for k, v in marks.items()
        ):
            log.warning("%s: not a high-water mark file; it is rewritten", self.path)
            return None
        return dict(marks)

    def _set_aside(self) -> None:
        """A folder, link or device in the file's place would make every save fail (and
        every start with it): move it aside, never follow it."""
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(self.path.lstat().st_mode):
                self.path.rename(self.path.with_name(f"{self.path.name}.damaged-{time.time_ns()}"))

    def save(self, marks: Mapping[str, int]) -> None:
        """Replace the file atomically and durably; raises OSError."""
        doc = {"schema": 1, "seq": dict(sorted(marks.items()))}
        write_atomic(self.path, json.dumps(doc).encode() + b"\n", mode=0o640)
