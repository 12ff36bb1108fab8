"""The landing area's entries (known by location and signature, duplicates, archive), and an
index on batches (model_name, status) for what every poll asks.

Frozen history: this file must not import shiftcost.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "landing_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archive_uri", sa.Text(), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('registered', 'duplicate', 'failed')", name=op.f("ck_landing_entries_state")),
        sa.CheckConstraint("kind IN ('file', 'folder', 'link', 'special')", name=op.f("ck_landing_entries_kind")),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_landing_entries_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_landing_entries")),
        sa.UniqueConstraint("model_name", "location", "signature", name=op.f("uq_landing_entries_model_name_location_signature")),
    )
    op.create_index(op.f("ix_landing_entries_batch_id"), "landing_entries", ["batch_id"], unique=False)
    op.create_index(op.f("ix_landing_entries_model_name_purged_at_archived_at"), "landing_entries", ["model_name", "purged_at", "archived_at"], unique=False)
    # A poll's questions (pending and deferred batches of a model) then do not scan its history.
    op.create_index(op.f("ix_batches_model_name_status"), "batches", ["model_name", "status"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_batches_model_name_status"), table_name="batches")
    op.drop_index(op.f("ix_landing_entries_model_name_purged_at_archived_at"), table_name="landing_entries")
    op.drop_index(op.f("ix_landing_entries_batch_id"), table_name="landing_entries")
    op.drop_table("landing_entries")
