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
    # UNIX seconds, as the batches keep their times: no conversion on the way in, the same on every database.
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
    # Every index is paid for on every insert, on the gateway's own CPU with SQLite: only the one reports use.
    sa.Index("ix_usage_log_created_at", "created_at"),
)

# Batch jobs. Times are UNIX seconds, as the OpenAI batch object gives them.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("cluster", sa.String(64), nullable=False),
    sa.Column("framework", sa.String(64), nullable=False),
    # The OpenAI url every line must use (``/v1/chat/completions``, ...); NULL when each line's fields tell.
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
    # The gateway replica that runs the batch, and until when (UNIX seconds) its claim holds unless renewed.
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires_at", sa.Double()),
    sa.Index("ix_batches_username_created_at", "username", "created_at"),
    sa.Index("ix_batches_status", "status"),
)

# Files of the OpenAI Files API: uploaded batch inputs, and the output and error files of finished batches.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.Text(), nullable=False),
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("path", sa.Text(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Index("ix_files_username", "username"),
)
