"""Index runs keep the mean max-softmax confidence of the batch (a label-free feature).

Frozen history: this file must not import shiftcost.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_runs") as batch:
        batch.add_column(sa.Column("mean_confidence", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_runs") as batch:
        batch.drop_column("mean_confidence")
