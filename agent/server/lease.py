"""Named leases in the database (table ``leases``): one server instance at a time
holds ``rollout:<id>`` and only the holder acts on that rollout.

Taking is one conditional statement each way, atomic on both engines: an UPDATE that
only matches when the lease is ours or has expired, else an INSERT that does nothing
when a row exists. Whoever's statement changed the row holds it until ``expires``; the
holder renews it every tick, and gives it up on stop or when the rollout ends. An
instance that dies simply stops renewing: another takes the lease once it expires.

Times are the database's clock (:func:`db_now`), not each instance's: with each
instance's own clock, one running 30 s ahead saw every other's lease as expired and
took it at its next tick (and one running behind waited that much longer after a
holder died). One clock for every instance makes "expired" mean the same to all.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from agent.server.schema import leases


def db_now(conn: sa.Connection) -> float:
    """The database server's time, in seconds since the epoch (SQLite: the clock of the
    machine holding the file, which every instance sharing it shares)."""
    if conn.dialect.name == "postgresql":
        query = sa.select(sa.extract("epoch", sa.func.clock_timestamp()))
    else:
        query = sa.select((sa.func.julianday("now") - 2440587.5) * 86400.0)
    return float(conn.execute(query).scalar_one())


def take(conn: sa.Connection, name: str, holder: str, now: float, lease_s: float) -> bool:
    """Take or renew ``name`` for ``holder`` until ``now + lease_s``; True when held."""
    renewed = conn.execute(
        leases.update()
        .where(
            leases.c.name == name,
            sa.or_(leases.c.holder == holder, leases.c.expires < now),
        )
        .values(holder=holder, expires=now + lease_s)
    ).rowcount
    if renewed == 1:
        return True
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(leases)
        .values(name=name, holder=holder, expires=now + lease_s)
        .on_conflict_do_nothing(index_elements=[leases.c.name])
        .returning(leases.c.name)
    )
    return conn.execute(stmt).first() is not None


def holds(conn: sa.Connection, name: str, holder: str, now: float) -> bool:
    """Whether ``holder`` holds ``name`` at ``now`` (checked inside each write)."""
    row = conn.execute(
        sa.select(leases.c.name).where(
            leases.c.name == name, leases.c.holder == holder, leases.c.expires >= now
        )
    ).first()
    return row is not None


def release(conn: sa.Connection, name: str, holder: str) -> None:
    """Give ``name`` up, when ``holder`` holds it."""
    conn.execute(leases.delete().where(leases.c.name == name, leases.c.holder == holder))


def holder_of(conn: sa.Connection, name: str) -> str | None:
    row = conn.execute(sa.select(leases.c.holder).where(leases.c.name == name)).first()
    return row.holder if row is not None else None
