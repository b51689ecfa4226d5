"""Which store a repository argument names: `s3://bucket/prefix` or a directory."""

from __future__ import annotations

from pathlib import Path

from safehold.repository.repository import Repository
from safehold.repository.store import S3_SCHEME, LocalStore


def is_remote(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def open_repository(location: str) -> Repository:
    """The repository at location; S3 is imported only when asked for."""
    if is_remote(location):
        from safehold.repository.s3 import S3Store

        return Repository(S3Store(location))
    return Repository(LocalStore(Path(location)))


def split_backup(reference: str) -> tuple[Repository, str]:
    """REPOSITORY/NAME (or a backup file's path) as its repository and the name in it."""
    if is_remote(reference):
        location, _, name = reference.rstrip("/").rpartition("/")
        return open_repository(location), name
    path = Path(reference)
    return open_repository(str(path.parent)), path.name
