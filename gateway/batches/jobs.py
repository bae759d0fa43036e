"""A batch job as the gateway keeps it, and as the API shows it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compute_functions.batch import ERRORS, RESULTS

ACTIVE = frozenset({"validating", "queued", "in_progress", "finalizing", "cancelling"})
STATUSES = (*sorted(ACTIVE), "completed", "failed", "cancelled", "expired")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class BatchJob:
    """One row of the ``batches`` table; ``folder`` holds its results, errors and progress record."""

    id: str
    username: str
    status: str
    model: str
    cluster: str
    framework: str
    endpoint: str | None
    input_file_path: str
    output_folder_path: str
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str
    user_metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    total: int | None
    completed: int
    failed: int
    attempts: int
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    @property
    def folder(self) -> Path:
        return Path(self.output_folder_path) / self.id

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def view(self) -> dict[str, Any]:
        """OpenAI's batch object, which the ``openai`` SDK parses, with the usage guide's fields besides."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total or 0, "completed": self.completed, "failed": self.failed},
            "metadata": self.user_metadata,
            "input_file_path": self.input_file_path,
            "output_folder_path": self.output_folder_path,
            "results_file": str(self.folder / RESULTS),
            "errors_file": str(self.folder / ERRORS),
            "cluster": self.cluster,
            "framework": self.framework,
        }


@dataclass
class StoredFile:
    """One row of the ``files`` table: an uploaded batch input, or a finished batch's output or error file."""

    id: str
    username: str
    purpose: str
    filename: str
    bytes: int
    path: str
    created_at: int

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
