"""The fleet server (issue 16, in progress): ``edge-fleet serve``.

``serve.py`` wires the parts and runs them; ``cli.py`` has the ``serve`` and ``token``
commands; ``app.py`` and ``api/`` the HTTP API; ``auth.py`` tokens and the audit log;
``metrics.py`` the Prometheus collector; ``ingest.py`` and ``inbound.py`` the ingester.

``schema.py`` (the tables), ``migrations/`` (Alembic, applied on start by ``db.py``),
``retention.py`` (pure rules: buckets, cut-offs, fields of a device's documents) and
``store.py`` (the writes the ingester makes). SQLAlchemy, Alembic and psycopg are
imported only inside this package: install the ``server`` extra to use it.
"""
