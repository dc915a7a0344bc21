"""Server-side rollouts: what a rollout's driver needs to resume after a restart
(per device: the issued desired state, when it was sent, what the device ran before,
the take-back after a halt, the fingerprint of its last news), the group's final
desired state, and at most one unfinished rollout per group (a partial unique index,
which SQLite and PostgreSQL both enforce).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

ACTIVE_SQL = "status IN ('running', 'paused', 'halting', 'aborting', 'finishing')"


def upgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        batch.add_column(sa.Column("issued_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("sent", sa.Double(), nullable=True))
        batch.add_column(sa.Column("prior_model", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("prior_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("seconds", sa.Double(), nullable=True))
        batch.add_column(
            sa.Column("timed_out", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("take_back", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("take_back_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("take_back_sent", sa.Double(), nullable=True))
        batch.add_column(sa.Column("seen", sa.JSON(), nullable=True))
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("final_issued_at", sa.Double(), nullable=True))
    op.create_index(
        "uq_rollouts_active_group",
        "rollouts",
        ["group_name"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_SQL),
        postgresql_where=sa.text(ACTIVE_SQL),
    )


def downgrade() -> None:
    op.drop_index("uq_rollouts_active_group", table_name="rollouts")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("final_issued_at")
    with op.batch_alter_table("rollout_devices") as batch:
        for name in (
            "seen",
            "take_back_sent",
            "take_back_at",
            "take_back",
            "timed_out",
            "seconds",
            "prior_version",
            "prior_model",
            "sent",
            "issued_at",
        ):
            batch.drop_column(name)
