"""Leases on batches: which gateway replica runs a batch, and until when its claim holds.

Revision ID: 0003_batch_leases
Revises: 0002_batches
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_batch_leases"
down_revision = "0002_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("lease_owner", sa.String(128)))
        table.add_column(sa.Column("lease_expires_at", sa.Double()))


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("lease_expires_at")
        table.drop_column("lease_owner")
