"""The initial schema: devices, telemetry, events, messages, deploys, rollouts, tokens,
audit and leases (issue 16). Generated from ``agent/server/schema.py`` and frozen here:
later schema changes are new revisions, never edits of this one.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    op.create_index(op.f("ix_audit_ts"), "audit", ["ts"], unique=False)
    op.create_index(op.f("ix_audit_who_ts"), "audit", ["who", "ts"], unique=False)
    op.create_table(
        "deploys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deploys")),
    )
    op.create_index(op.f("ix_deploys_created"), "deploys", ["created"], unique=False)
    op.create_index(
        op.f("ix_deploys_target_kind_target_created"),
        "deploys",
        ["target_kind", "target", "created"],
        unique=False,
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("status", sa.JSON(), nullable=True),
        sa.Column("state", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_model_version"), "devices", ["model", "version"], unique=False)
    op.create_index(op.f("ix_devices_online"), "devices", ["online"], unique=False)
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("update_id", sa.String(length=64), nullable=True),
        sa.Column("fields", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_device_ts"), "events", ["device", "ts"], unique=False)
    op.create_index(op.f("ix_events_event_ts"), "events", ["event", "ts"], unique=False)
    op.create_index(
        op.f("ix_events_model_version_ts"), "events", ["model", "version", "ts"], unique=False
    )
    op.create_index(op.f("ix_events_ts"), "events", ["ts"], unique=False)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("stream", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("ts", sa.Double(), nullable=True),
        sa.Column("received", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    op.create_index(op.f("ix_messages_received"), "messages", ["received"], unique=False)
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("updated", sa.Double(), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("group_name", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(
        op.f("ix_rollouts_group_name_status"), "rollouts", ["group_name", "status"], unique=False
    )
    op.create_index(op.f("ix_rollouts_status"), "rollouts", ["status"], unique=False)
    op.create_table(
        "telemetry_agg",
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("metric", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.Double(), nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device", "metric", "bucket", name=op.f("pk_telemetry_agg")),
    )
    op.create_index(op.f("ix_telemetry_agg_bucket"), "telemetry_agg", ["bucket"], unique=False)
    op.create_table(
        "telemetry_raw",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("metric", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_raw")),
    )
    op.create_index(
        op.f("ix_telemetry_raw_device_metric_ts"),
        "telemetry_raw",
        ["device", "metric", "ts"],
        unique=False,
    )
    op.create_index(op.f("ix_telemetry_raw_ts"), "telemetry_raw", ["ts"], unique=False)
    op.create_table(
        "tokens",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("hash", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created", sa.Double(), nullable=False),
        sa.Column("revoked", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("hash", name=op.f("uq_tokens_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_tokens_name")),
    )
    op.create_table(
        "device_groups",
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("group_name", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["device"],
            ["devices.id"],
            name=op.f("fk_device_groups_device_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device", "group_name", name=op.f("pk_device_groups")),
    )
    op.create_index(
        op.f("ix_device_groups_group_name"), "device_groups", ["group_name"], unique=False
    )
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("update_id", sa.String(length=64), nullable=True),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("last_heard", sa.Double(), nullable=True),
        sa.Column("updated", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_devices_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device", name=op.f("pk_rollout_devices")),
    )
    op.create_index(op.f("ix_rollout_devices_device"), "rollout_devices", ["device"], unique=False)
    op.create_table(
        "rollout_steps",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started", sa.Double(), nullable=True),
        sa.Column("finished", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_steps_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "step", name=op.f("pk_rollout_steps")),
    )


def downgrade() -> None:
    op.drop_table("rollout_steps")
    op.drop_index(op.f("ix_rollout_devices_device"), table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index(op.f("ix_device_groups_group_name"), table_name="device_groups")
    op.drop_table("device_groups")
    op.drop_table("tokens")
    op.drop_index(op.f("ix_telemetry_raw_ts"), table_name="telemetry_raw")
    op.drop_index(op.f("ix_telemetry_raw_device_metric_ts"), table_name="telemetry_raw")
    op.drop_table("telemetry_raw")
    op.drop_index(op.f("ix_telemetry_agg_bucket"), table_name="telemetry_agg")
    op.drop_table("telemetry_agg")
    op.drop_index(op.f("ix_rollouts_status"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_group_name_status"), table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index(op.f("ix_messages_received"), table_name="messages")
    op.drop_table("messages")
    op.drop_table("leases")
    op.drop_index(op.f("ix_events_ts"), table_name="events")
    op.drop_index(op.f("ix_events_model_version_ts"), table_name="events")
    op.drop_index(op.f("ix_events_event_ts"), table_name="events")
    op.drop_index(op.f("ix_events_device_ts"), table_name="events")
    op.drop_table("events")
    op.drop_index(op.f("ix_devices_online"), table_name="devices")
    op.drop_index(op.f("ix_devices_model_version"), table_name="devices")
    op.drop_table("devices")
    op.drop_index(op.f("ix_deploys_target_kind_target_created"), table_name="deploys")
    op.drop_index(op.f("ix_deploys_created"), table_name="deploys")
    op.drop_table("deploys")
    op.drop_index(op.f("ix_audit_who_ts"), table_name="audit")
    op.drop_index(op.f("ix_audit_ts"), table_name="audit")
    op.drop_table("audit")
