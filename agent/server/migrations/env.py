"""Alembic's environment, run only through ``agent.server.db`` (no alembic.ini).

``db.py`` passes an open connection in ``config.attributes["connection"]``; offline
(SQL script) mode is not supported.
"""

from __future__ import annotations

from alembic import context

from agent.server.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
