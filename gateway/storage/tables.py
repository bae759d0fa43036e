"""The gateway's tables. Alembic migrations under ``migrations/`` create and change them; keep both in step."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

usage_log = sa.Table(
    "usage_log",
    metadata,
    # Made by the gateway, not the client, so that replaying a spooled row can never collide with another.
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    # UTC without a zone, so that a day is the same day on SQLite and PostgreSQL.
    sa.Column("created_at", sa.DateTime(), nullable=False),
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
    sa.Index("ix_usage_log_created_at", "created_at"),
    sa.Index("ix_usage_log_username_created_at", "username", "created_at"),
    sa.Index("ix_usage_log_request_id", "request_id"),
)
