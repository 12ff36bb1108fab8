"""A retrain run proves it is alive (retrain_runs.heartbeat_at); budgets can be disabled
(budgets.disabled_at).

Frozen history: this file must not import shiftcost.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("retrain_runs", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("budgets", sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table, PostgreSQL drops the column in place.
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("disabled_at")
    with op.batch_alter_table("retrain_runs") as batch:
        batch.drop_column("heartbeat_at")
