"""The newest telemetry document of each device, on its row in ``devices``.

The device list shows live figures (fps, p95, temperature, backend, outbox depth) from
each device's latest telemetry; reading them from ``telemetry_raw`` would be a search
per device and metric, and the strings (``inference.backend``) are not kept there.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("telemetry", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("telemetry_ts", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("telemetry_ts")
        batch_op.drop_column("telemetry")
