"""An index on ``telemetry_agg (metric, bucket)``: the dashboard's alerts read a few
metrics of every device over the last 15 minutes; without it SQLite scans the whole
table (it grows with the retention: 90 days of minute aggregates by default).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_telemetry_agg_metric_bucket"), "telemetry_agg", ["metric", "bucket"])


def downgrade() -> None:
    op.drop_index(op.f("ix_telemetry_agg_metric_bucket"), table_name="telemetry_agg")
