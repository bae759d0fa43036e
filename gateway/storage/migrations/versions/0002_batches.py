"""Batch jobs, and the files of the OpenAI Files API.

Revision ID: 0002_batches
Revises: 0001
Create Date: 2025-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_batches"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("cluster", sa.String(64), nullable=False),
        sa.Column("framework", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64)),
        sa.Column("input_file_path", sa.Text(), nullable=False),
        sa.Column("output_folder_path", sa.Text(), nullable=False),
        sa.Column("input_file_id", sa.String(64)),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("user_metadata", sa.JSON()),
        sa.Column("errors", sa.JSON()),
        sa.Column("total", sa.Integer()),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("in_progress_at", sa.BigInteger()),
        sa.Column("finalizing_at", sa.BigInteger()),
        sa.Column("completed_at", sa.BigInteger()),
        sa.Column("failed_at", sa.BigInteger()),
        sa.Column("expired_at", sa.BigInteger()),
        sa.Column("cancelling_at", sa.BigInteger()),
        sa.Column("cancelled_at", sa.BigInteger()),
    )
    op.create_index("ix_batches_username_created_at", "batches", ["username", "created_at"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_files_username", "files", ["username"])


def downgrade() -> None:
    op.drop_table("files")
    op.drop_table("batches")
