"""Retrain runs and batches can be stopped by the in-flight budget guard.

retrain_runs.status and batches.status gain stopped_by_budget: the run was ended by the
budget guard because its forecast no longer fitted what the budget had left; its measured
spend is settled and the model is unchanged.

Frozen history: this file must not import shiftcost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_RUN = "status IN ('running', 'succeeded', 'failed', 'cap_reached')"
_NEW_RUN = "status IN ('running', 'succeeded', 'failed', 'cap_reached', 'stopped_by_budget')"
_OLD_BATCH = "status IN ('registered', 'assessing', 'assessed', 'awaiting_labels', 'retraining', 'done', 'failed')"
_NEW_BATCH = "status IN ('registered', 'assessing', 'assessed', 'awaiting_labels', 'retraining', 'done', 'failed', 'stopped_by_budget')"


def _replace_check(table: str, condition: str) -> None:
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint("status", type_="check")
        batch.create_check_constraint("status", condition)


def upgrade() -> None:
    _replace_check("retrain_runs", _NEW_RUN)
    _replace_check("batches", _NEW_BATCH)


def downgrade() -> None:
    # Rows in the new state have no place in the old vocabulary: they end as failed.
    op.execute("UPDATE retrain_runs SET status = 'failed' WHERE status = 'stopped_by_budget'")
    op.execute("UPDATE batches SET status = 'failed' WHERE status = 'stopped_by_budget'")
    _replace_check("retrain_runs", _OLD_RUN)
    _replace_check("batches", _OLD_BATCH)
