"""The batch's folder and the paths a batch may use: checked against the allowed roots, opened without following links.

Every file of the folder is opened relative to the folder's own descriptor, so a symbolic link swapped in after the
check cannot send a write elsewhere.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
PROGRESS = "progress.json"
CANCEL = "cancel"
LOCK = "lock"
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class BatchRefused(Exception):
    """The batch cannot run at all (paths outside the roots, too many lines, input changed); it fails."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def inside(path: Path, roots: list[str]) -> bool:
    """Whether ``path`` (already resolved) lies in one of ``roots`` (each resolved here)."""
    return any(path.is_relative_to(Path(root).resolve()) for root in roots)


def checked_path(raw: str, roots: list[str], what: str, *, must_exist: bool) -> Path:
    """``raw`` resolved (symlinks and `..` included); ``BatchRefused`` unless it is absolute and inside ``roots``."""
    if "\0" in raw:
        # The operating system cannot take it, and Python says so with a ValueError, not an OSError.
        raise BatchRefused("invalid_path", f"The {what} path {raw!r} contains a NUL byte.")
    path = Path(raw)
    if not path.is_absolute():
        raise BatchRefused("invalid_path", f"The {what} must be an absolute path, not '{raw}'.")
    try:
        resolved = path.resolve(strict=must_exist)
    except FileNotFoundError:
        raise BatchRefused("file_not_found", f"The {what} '{raw}' does not exist.") from None
    except (OSError, RuntimeError) as exc:
        raise BatchRefused("invalid_path", f"The {what} '{raw}' cannot be resolved: {exc}.") from None
    if not inside(resolved, roots):
        raise BatchRefused(
            "path_not_allowed",
            f"The {what} '{raw}' resolves to '{resolved}', which is outside the folders batches may use here: "
            f"{', '.join(str(Path(root).resolve()) for root in roots)}.",
        )
    return resolved


def opened_inside(fd: int, roots: list[str], what: str) -> None:
    """Check what ``fd`` really is, after the opening: a symlink swapped in since the check is caught here."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return
    if not inside(real, roots):
        raise BatchRefused("path_not_allowed", f"The {what} moved outside the folders batches may use here.")


@dataclass
class Folder:
    """The batch's folder, held open so that every file in it is opened relative to the folder itself."""

    path: Path
    fd: int

    @classmethod
    def open(cls, raw: str, roots: list[str]) -> Folder:
        path = checked_path(raw, roots, "output folder", must_exist=False)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
        except OSError as exc:
            raise BatchRefused("invalid_path", f"The output folder '{raw}' cannot be used: {exc.strerror}.") from None
        folder = cls(path, fd)
        try:
            opened_inside(fd, roots, "output folder")
        except BatchRefused:
            folder.close()
            raise
        return folder

    def open_file(self, name: str, flags: int, mode: int = 0o640) -> int:
        try:
            return os.open(name, flags | NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BatchRefused("path_not_allowed", f"'{self.path / name}' is a symbolic link.") from None
            raise

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def replace(self, name: str, data: bytes) -> None:
        partial = f".{name}.{os.getpid()}"
        fd = self.open_file(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def read(self, name: str) -> bytes | None:
        try:
            fd = self.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def close(self) -> None:
        os.close(self.fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
