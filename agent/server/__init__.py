"""The fleet server (issue 16, in progress): storage first.

``schema.py`` (the tables), ``migrations/`` (Alembic, applied on start by ``db.py``),
``retention.py`` (pure rules: buckets, cut-offs, fields of a device's documents) and
``store.py`` (the writes the ingester makes). SQLAlchemy, Alembic and psycopg are
imported only inside this package: install the ``server`` extra to use it.
"""
