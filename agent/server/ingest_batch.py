"""Storing what the ingester (:mod:`agent.server.ingest`) received: a batch of device
messages read (:func:`agent.server.inbound.read`) and stored in ONE transaction
(:func:`agent.server.store.store_batch`), retried with capped backoff while the database
is down, one by one when the database refuses the batch for one of its messages; and
the counters that say so. No MQTT here: the ingester acknowledges what this stored."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from agent.server.inbound import REASONS, Inbound, Malformed, Reason, read
from agent.server.retention import stored_time
from agent.server.store import store_batch

log = logging.getLogger("agent.server.ingest")  # one logger for the ingester's lines

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
NEWS = frozenset({"status", "state", "events"})  # what a rollout step is judged on


@dataclass
class Counters:
    """What the ingester counts; read and written under its lock."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    lag_s: float | None = None
    database_error: str | None = None


@dataclass(frozen=True)
class Pending:
    """A message as delivered, until it is stored and acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    session: int  # which connection delivered it: acknowledged only on that one
    received: float


class BatchWriter:
    """Stores batches for one ingester: its engine, its counters under its lock, its
    stop event (a retry ends when it is set)."""

    def __init__(
        self,
        engine: sa.Engine,
        prefix: str,
        counters: Counters,
        lock: threading.Lock,
        stopping: threading.Event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.prefix = prefix
        self.counters = counters
        self.lock = lock
        self.stopping = stopping
        self.clock = clock

    def write(self, batch: list[Pending]) -> bool | None:
        """Store ``batch`` in one transaction, retrying with capped backoff while the
        database is down; a message the database refuses for itself is counted
        ``contract`` and skipped, a malformed one counted by reason. Whether a status, a
        state or an event was stored (news for the rollouts); None when stopped first
        (then nothing may be acknowledged)."""
        read_ = [(p, read(self.prefix, p.topic, p.payload)) for p in batch]
        good: list[tuple[Pending, Inbound]] = []
        for pending, inbound in read_:
            if isinstance(inbound, Malformed):
                log.debug("skipped a message on %r: %s", pending.topic[:200], inbound.detail)
                self._count_malformed(inbound.reason)
            else:
                good.append((pending, inbound))
        delay = RETRY_MIN_S
        results: list[bool | None] = []
        while good:
            try:
                try:
                    results = self._store(good)
                except DBAPIError as exc:
                    if exc.connection_invalidated or transient(exc):
                        raise
                    results = self._one_by_one(good)  # the database refuses one of them
                break
            except SQLAlchemyError as exc:
                self._database_down(exc)
            if self.stopping.wait(delay):
                return None  # not acknowledged: delivered again to this session later
            delay = min(delay * 2, RETRY_MAX_S)
        self._count_stored(good, results)
        return any(r is True and m.stream in NEWS for (_, m), r in zip(good, results, strict=True))

    def _one_by_one(self, batch: list[tuple[Pending, Inbound]]) -> list[bool | None]:
        """Each message in its own transaction, after their batch was refused: the one
        the database refuses for itself (not a connection failure) is counted
        ``contract`` and skipped (None). A connection failure is raised: the caller
        retries the batch, whose stored messages are then duplicates."""
        results: list[bool | None] = []
        for item in batch:
            try:
                results.append(self._store([item])[0])
            except DBAPIError as exc:
                if exc.connection_invalidated or transient(exc):
                    raise
                log.warning("database refused a message of %s: %s", item[1].device, exc)
                self._count_malformed("contract")
                results.append(None)
        return results

    def _count_stored(
        self, msgs: list[tuple[Pending, Inbound]], results: list[bool | None]
    ) -> None:
        with self.lock:
            c = self.counters
            c.database_error = None
            for (pending, msg), stored in zip(msgs, results, strict=True):
                if stored is True:
                    c.stored += 1
                    if msg.ts is not None:
                        c.lag_s = max(0.0, self.clock() - stored_time(msg.ts, pending.received))
                elif stored is False:
                    c.duplicates += 1

    def _store(self, batch: list[tuple[Pending, Inbound]]) -> list[bool | None]:
        """One transaction for ``batch`` (:func:`agent.server.store.store_batch`)."""
        with self.engine.begin() as conn:
            stored = store_batch(conn, [(m, p.received) for p, m in batch])
        return list(stored)

    def _count_malformed(self, reason: Reason) -> None:
        with self.lock:
            self.counters.malformed[reason] += 1

    def _database_down(self, exc: SQLAlchemyError) -> None:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0:1]
        with self.lock:
            first = self.counters.database_error is None
            self.counters.database_error = reason[0] if reason else type(exc).__name__
        if first:
            log.warning("database unavailable, holding messages: %s", reason)


def transient(exc: DBAPIError) -> bool:
    """A failure of the database, not of the message: retried."""
    return isinstance(exc, OperationalError | InterfaceError)
