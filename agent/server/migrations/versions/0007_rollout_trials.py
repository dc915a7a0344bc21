"""Shadow rollouts: what a member's trial (its shadow run of the candidate, judged
before its desired state) needs to resume after a restart: its verdict and reason,
when its instruction was sent, its last news and the run's progress then, how long it
took, and when its instruction was cleared. The rollout's shadow options (and the one
``issued_at`` of its instructions) live in ``rollouts.options``.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

COLUMNS: tuple[tuple[str, Any], ...] = (
    ("trial", sa.String(length=16)),
    ("trial_reason", sa.Text()),
    ("trial_sent", sa.Double()),
    ("trial_heard", sa.Double()),
    ("trial_seen", sa.JSON()),
    ("trial_seconds", sa.Double()),
    ("trial_cleared", sa.Double()),
)


def upgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
