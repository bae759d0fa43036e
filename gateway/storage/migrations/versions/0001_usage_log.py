"""The usage log: one row per inference request.

Revision ID: 0001
Revises:
Create Date: 2025-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_log",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("cluster", sa.String(64)),
        sa.Column("framework", sa.String(64)),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("transport", sa.String(16)),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("time_to_first_token", sa.Float()),
        sa.Column("duration", sa.Float(), nullable=False),
    )
    op.create_index("ix_usage_log_created_at", "usage_log", ["created_at"])


def downgrade() -> None:
    op.drop_table("usage_log")
