"""Model versions get a status (the promotion gate); batches can wait for their labels.

models.status: active (may be current: the newest active version is), pending (passed the
gate, waits for `shiftcost model approve`), rejected (failed the gate; kept with its
figures). batches.status gains awaiting_labels; batches.labels_uri names labels attached
after the batch arrived.

Frozen history: this file must not import shiftcost.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_BATCH = "status IN ('registered', 'assessing', 'assessed', 'retraining', 'done', 'failed')"
_NEW_BATCH = "status IN ('registered', 'assessing', 'assessed', 'awaiting_labels', 'retraining', 'done', 'failed')"


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("status", sa.String(length=20), nullable=False, server_default="active"))
        batch.create_check_constraint("status", "status IN ('active', 'pending', 'rejected')")
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("labels_uri", sa.Text(), nullable=True))
        batch.drop_constraint("status", type_="check")
        batch.create_check_constraint("status", _NEW_BATCH)


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint("status", type_="check")
        batch.create_check_constraint("status", _OLD_BATCH)
        batch.drop_column("labels_uri")
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("status", type_="check")
        batch.drop_column("status")
