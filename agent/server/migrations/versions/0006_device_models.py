"""Every model a device serves as rows of ``device_models`` (device, model, version): the
fleet's counts by model (the overview, ``/metrics``, the known models) count a device
serving two models (several pipelines or a cascade, issue 20) under each.

Existing devices get their rows from their stored state document (its ``models``, and
its top-level model) here; later state documents rewrite them.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# frozen here (a migration must not change with the code): the model name rule and the
# most models kept of one state document at the time of this migration
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_MODELS = 32
_BATCH = 500


def _version(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
    return value if ok else None


def _served(state: Any, model: Any, version: Any) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    if isinstance(model, str) and _NAME.fullmatch(model):
        out[model] = _version(version)
    models = state.get("models") if isinstance(state, Mapping) else None
    if isinstance(models, Mapping):
        for name, part in models.items():
            if len(out) >= _MAX_MODELS:
                break
            if isinstance(name, str) and _NAME.fullmatch(name) and isinstance(part, Mapping):
                out[name] = _version(part.get("version"))
    return out


def upgrade() -> None:
    table = op.create_table(
        "device_models",
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device"],
            ["devices.id"],
            name=op.f("fk_device_models_device_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device", "model", name=op.f("pk_device_models")),
    )
    op.create_index(
        op.f("ix_device_models_model_version"), "device_models", ["model", "version"], unique=False
    )
    devices = sa.table(
        "devices",
        sa.column("id", sa.String()),
        sa.column("model", sa.String()),
        sa.column("version", sa.Integer()),
        sa.column("state", sa.JSON()),
    )
    conn = op.get_bind()
    rows: list[dict[str, Any]] = []
    found = conn.execute(
        sa.select(devices.c.id, devices.c.model, devices.c.version, devices.c.state)
    )
    for device, model, version, state in found:
        rows += [
            {"device": device, "model": m, "version": v}
            for m, v in _served(state, model, version).items()
        ]
        if len(rows) >= _BATCH:
            conn.execute(sa.insert(table), rows)
            rows = []
    if rows:
        conn.execute(sa.insert(table), rows)


def downgrade() -> None:
    op.drop_index(op.f("ix_device_models_model_version"), table_name="device_models")
    op.drop_table("device_models")
