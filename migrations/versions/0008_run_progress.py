"""A running retrain's heartbeat carries what it has done so far (retrain_runs.progress).

When the run's process is then killed outright, the watch that closes it settles that
work, priced at the host's energy rate, instead of releasing the reservation as if
nothing had been spent.

Frozen history: this file must not import shiftcost.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON on SQLite, JSONB on PostgreSQL, as in 0001.
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("retrain_runs", sa.Column("progress", JSON_TYPE, nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table, PostgreSQL drops the column in place.
    with op.batch_alter_table("retrain_runs") as batch:
        batch.drop_column("progress")
