"""The fleet server's tables: one SQLAlchemy Core ``MetaData`` for SQLite and PostgreSQL.

Times are seconds since the epoch as double-precision floats, as in every document the
devices send (``ts``): no time-zone conversion, and the same comparisons on both engines.
JSON columns use the portable ``sa.JSON`` (text on SQLite, ``json`` on PostgreSQL).
The initial migration (``migrations/versions/0001_initial.py``) creates exactly this;
a test compares the two with Alembic's autogenerate.
"""

from __future__ import annotations

import sqlalchemy as sa

# Constraint names fixed by convention, so migrations can name what they alter.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING)

# An autoincrementing 64-bit key; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Double  # seconds since the epoch
DEVICE = 128  # device ids and group names are short topic levels
NAME = 128

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.String(DEVICE), primary_key=True),
    sa.Column("groups", sa.JSON, nullable=False),  # list of group names
    sa.Column("agent_version", sa.String(64)),
    sa.Column("model", sa.String(NAME)),  # the active release, from the state document
    sa.Column("version", sa.Integer),
    sa.Column("first_seen", Time, nullable=False),
    sa.Column("last_seen", Time, nullable=False),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("status", sa.JSON),  # the last status document
    sa.Column("state", sa.JSON),  # the last state document
    # The newest telemetry document and its ``ts`` (migration 0002): the device list's
    # live figures in the same row, with the strings (backend) telemetry_raw drops.
    sa.Column("telemetry", sa.JSON),
    sa.Column("telemetry_ts", Time),
    sa.Index(None, "model", "version"),
    sa.Index(None, "online"),
)

# Group membership as rows, so "devices of group G" is an index lookup on both engines
# (a JSON list cannot be indexed portably). Rewritten from each status document.
device_groups = sa.Table(
    "device_groups",
    metadata,
    sa.Column(
        "device",
        sa.String(DEVICE),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("group_name", sa.String(NAME), primary_key=True),
    sa.Index(None, "group_name"),
)

# Every model a device serves, with its version, as rows (migration 0006): the state's
# ``models`` (several pipelines or a cascade), else its top-level model. Rewritten from
# each state document; what the fleet's counts by model (overview, /metrics, the known
# models) group on, so a device serving two models counts under each.
device_models = sa.Table(
    "device_models",
    metadata,
    sa.Column(
        "device",
        sa.String(DEVICE),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("model", sa.String(NAME), primary_key=True),
    sa.Column("version", sa.Integer),
    sa.Index(None, "model", "version"),
)

# One row per (device, time, metric): a narrow table serves any metric a new agent adds
# without a migration, and "one metric of one device over time" is one index range.
telemetry_raw = sa.Table(
    "telemetry_raw",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(DEVICE), nullable=False),
    sa.Column("ts", Time, nullable=False),
    sa.Column("metric", sa.String(NAME), nullable=False),
    sa.Column("value", sa.Double, nullable=False),
    sa.Index(None, "device", "metric", "ts"),
    sa.Index(None, "ts"),  # pruning
)

# 1-minute aggregates. ``sum`` and ``count`` rather than a stored average: a late sample
# folds in exactly (avg = sum / count), and coarser steps are sums of sums.
telemetry_agg = sa.Table(
    "telemetry_agg",
    metadata,
    sa.Column("device", sa.String(DEVICE), primary_key=True),
    sa.Column("metric", sa.String(NAME), primary_key=True),
    sa.Column("bucket", Time, primary_key=True),  # start of the minute
    sa.Column("min", sa.Double, nullable=False),
    sa.Column("max", sa.Double, nullable=False),
    sa.Column("sum", sa.Double, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Index(None, "bucket"),  # pruning
    sa.Index(None, "metric", "bucket"),  # the dashboard's alerts: a window of a few metrics
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(DEVICE), nullable=False),
    sa.Column("ts", Time, nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("model", sa.String(NAME)),
    sa.Column("version", sa.Integer),
    sa.Column("update_id", sa.String(64)),
    sa.Column("fields", sa.JSON, nullable=False),  # the event's detail
    sa.Index(None, "device", "ts"),
    sa.Index(None, "model", "version", "ts"),
    sa.Index(None, "event", "ts"),
    sa.Index(None, "ts"),
)

# Idempotency: every device message carries an ``id``; a second delivery of it (QoS 1
# redelivery, two server instances) finds the row and is dropped.
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(DEVICE), nullable=False),
    sa.Column("stream", sa.String(32), nullable=False),  # status, state, telemetry, …
    sa.Column("seq", sa.BigInteger),
    sa.Column("ts", Time),  # the device's clock
    sa.Column("received", Time, nullable=False),  # the server's clock: pruning
    sa.Index(None, "received"),
)

deploys = sa.Table(
    "deploys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created", Time, nullable=False),
    sa.Column("who", sa.String(NAME), nullable=False),
    sa.Column("target_kind", sa.String(16), nullable=False),  # device | group
    sa.Column("target", sa.String(DEVICE), nullable=False),
    sa.Column("model", sa.String(NAME), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("desired", sa.JSON, nullable=False),  # the signed document published
    sa.Column("rollout_id", sa.String(64)),
    sa.Index(None, "target_kind", "target", "created"),
    sa.Index(None, "created"),
)

# Rollout statuses that hold the group (agent.server.rollouts.ACTIVE); a literal here so
# the partial index reads the same on both engines.
ACTIVE_SQL = "status IN ('running', 'paused', 'halting', 'aborting', 'finishing')"

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created", Time, nullable=False),
    sa.Column("updated", Time, nullable=False),
    sa.Column("who", sa.String(NAME), nullable=False),
    sa.Column("group_name", sa.String(NAME), nullable=False),
    sa.Column("model", sa.String(NAME), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("options", sa.JSON, nullable=False),  # the options of `edge-fleet rollout`
    sa.Column("status", sa.String(16), nullable=False),  # running, paused, aborted, …
    sa.Column("step", sa.Integer, nullable=False),  # the current step
    sa.Column("reason", sa.Text),
    # The group's desired state at the end (set once, so a resumed finish re-sends it
    # unchanged); migration 0003.
    sa.Column("final_issued_at", Time),
    sa.Index(None, "group_name", "status"),
    sa.Index(None, "status"),
    # At most one unfinished rollout per group, enforced by both engines (migration 0003).
    sa.Index(
        "uq_rollouts_active_group",
        "group_name",
        unique=True,
        sqlite_where=sa.text(ACTIVE_SQL),
        postgresql_where=sa.text(ACTIVE_SQL),
    ),
)

rollout_steps = sa.Table(
    "rollout_steps",
    metadata,
    sa.Column(
        "rollout_id",
        sa.String(64),
        sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("size", sa.Integer, nullable=False),  # devices in this step
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started", Time),
    sa.Column("finished", Time),
)

rollout_devices = sa.Table(
    "rollout_devices",
    metadata,
    sa.Column(
        "rollout_id",
        sa.String(64),
        sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("device", sa.String(DEVICE), primary_key=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("update_id", sa.String(64)),
    sa.Column("phase", sa.String(32)),
    sa.Column("outcome", sa.String(32)),
    sa.Column("reason", sa.Text),
    sa.Column("last_heard", Time),  # timeouts judge a device's silence
    sa.Column("updated", Time, nullable=False),
    # Migration 0003: what the driver needs to resume a step after a restart.
    sa.Column("issued_at", Time),  # its desired state's, chosen before it is published
    sa.Column("sent", Time),  # when the broker acknowledged it (None: not yet)
    sa.Column("prior_model", sa.String(NAME)),  # what it ran when its step began
    sa.Column("prior_version", sa.Integer),
    sa.Column("seconds", Time),  # from sent to its verdict
    sa.Column("timed_out", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("take_back", sa.String(16)),  # after a halt: clear | set_back
    sa.Column("take_back_at", Time),  # issued_at of a set-back desired state
    sa.Column("take_back_sent", Time),
    sa.Column("seen", sa.JSON),  # the fingerprint of its reports at the last news
    # Migration 0007: a shadow rollout's trial of the member (agent.server.rollshadow).
    sa.Column("trial", sa.String(16)),  # None, pending, succeeded, failed
    sa.Column("trial_reason", sa.Text),
    sa.Column("trial_sent", Time),  # its shadow instruction acknowledged by the broker
    sa.Column("trial_heard", Time),
    sa.Column("trial_seen", sa.JSON),  # the run's progress at the last news
    sa.Column("trial_seconds", Time),
    sa.Column("trial_cleared", Time),  # its shadow instruction cleared
    sa.Index(None, "device"),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("hash", sa.String(128), nullable=False, unique=True),  # never the token
    sa.Column("role", sa.String(16), nullable=False),  # viewer | operator
    sa.Column("name", sa.String(NAME), nullable=False, unique=True),
    sa.Column("created", Time, nullable=False),
    sa.Column("revoked", Time),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("ts", Time, nullable=False),
    sa.Column("who", sa.String(NAME), nullable=False),  # the token's name
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(NAME)),
    sa.Column("detail", sa.JSON),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Index(None, "ts"),
    sa.Index(None, "who", "ts"),
)

# A named lease (e.g. "rollout:<id>"): one instance holds it until ``expires``.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("holder", sa.String(NAME), nullable=False),
    sa.Column("expires", Time, nullable=False),
)

# The dashboard's sessions (migration 0004): a browser logs in with an API token and gets
# a random session secret in a cookie; only its SHA-256 is stored, as for tokens. Every
# request joins the token again, so a revoked token ends its sessions at once.
ui_sessions = sa.Table(
    "ui_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # SHA-256 (hex) of the cookie's secret
    sa.Column(
        "token_id",
        BigId,
        sa.ForeignKey("tokens.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("csrf", sa.String(64), nullable=False),  # every POST form carries it
    sa.Column("created", Time, nullable=False),
    sa.Column("expires", Time, nullable=False),
    sa.Index(None, "token_id"),
    sa.Index(None, "expires"),  # pruning
)
