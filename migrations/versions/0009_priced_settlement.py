"""A settlement at a dead run's priced work says so in a column (budget_ledger.priced).

Such a settlement is the only one a late measure may replace: the run was closed as dead
but finished after all. Until now the ledger told it apart by a marker in its reason
text; existing settlements carrying that marker are marked priced here.

Frozen history: this file must not import shiftcost.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The reason marker shiftcost 0008 wrote on every priced settlement.
_MARKER = "%priced, not measured%"


def upgrade() -> None:
    with op.batch_alter_table("budget_ledger") as batch:
        batch.add_column(sa.Column("priced", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_check_constraint("priced_settles", "NOT priced OR kind = 'settle'")
    ledger = sa.table("budget_ledger", sa.column("kind", sa.String), sa.column("reason", sa.Text), sa.column("priced", sa.Boolean))
    op.execute(
        ledger.update().where(ledger.c.kind == "settle", ledger.c.reason.like(_MARKER)).values(priced=sa.true())
    )


def downgrade() -> None:
    # The reason text keeps the marker, so 0008's reading of it still holds.
    with op.batch_alter_table("budget_ledger") as batch:
        batch.drop_constraint("priced_settles", type_="check")
        batch.drop_column("priced")
