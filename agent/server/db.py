"""Open the fleet server's database and bring its schema to the newest migration.

``open_database(url)`` accepts ``sqlite:///PATH`` (the default: one file, nothing to set
up) and ``postgresql://…`` (run through psycopg 3). Every failure to parse, reach or
migrate is one ``DatabaseError`` naming the database without its password.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from agent.errors import DatabaseError

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 5
# Any fixed 64-bit key: instances starting together migrate one after the other.
_MIGRATION_LOCK = 0x6564676546_1EE7


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL for ``url``, with PostgreSQL mapped to the psycopg driver.

    Raises DatabaseError for anything but ``sqlite:///PATH`` and ``postgresql://…``.
    """
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise DatabaseError(
            f"database URL {url!r} is not valid: use sqlite:///PATH or postgresql://…"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver == "":
        if not parsed.database:
            raise DatabaseError(
                f"database URL {url!r} names no file: use sqlite:///PATH (an in-memory "
                "database would lose everything at exit)"
            )
        return parsed
    raise DatabaseError(
        f"database URL {_shown(parsed)} is not supported: use sqlite:///PATH or postgresql://…"
    )


def open_database(url: str) -> Engine:
    """An engine for ``url`` whose schema is at the newest migration.

    Migrations run on every start and are a no-op when the schema is current. SQLite
    connections use WAL and enforce foreign keys. Raises DatabaseError (bad URL,
    unreachable, refused, migration failed); the engine is disposed of on failure.
    """
    parsed = parse_url(url)
    engine = _engine(parsed)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            _upgrade(conn)
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseError(f"database {_shown(parsed)}: {reason}") from None
    return engine


def alembic_config(conn: sa.Connection) -> Config:
    """Alembic's configuration for our migrations, run on ``conn`` (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _upgrade(conn: sa.Connection) -> None:
    command.upgrade(alembic_config(conn), "head")


def _engine(parsed: URL) -> Engine:
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
        )
    engine = sa.create_engine(parsed, connect_args={"timeout": CONNECT_TIMEOUT_S})
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable with WAL, without an fsync a commit
    finally:
        cursor.close()


def _shown(parsed: URL) -> str:
    return parsed.render_as_string(hide_password=True)
