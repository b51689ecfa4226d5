"""Where a repository keeps its objects: one small interface, a directory or S3 behind it.

Like Litestream's ReplicaClient, a store knows nothing of backups: it puts a stream
under a name (visible only once complete), opens one, lists names and deletes. All
that backups need (manifests, latest, prune, verify) is written once above it, in
repository.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from safehold.files import atomic_path

S3_SCHEME = "s3://"


class Store(Protocol):
    """A flat namespace of immutable objects."""

    location: str
    """Where the store is, for messages (a path or an s3:// URL)."""

    def objects(self) -> dict[str, datetime]:
        """Every complete object's name, and when it was last written (UTC)."""
        ...

    def exists(self, name: str) -> bool: ...

    def create(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A stream to write name with; the object appears only if the block succeeds."""
        ...

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """The object's bytes, streamed."""
        ...

    def delete(self, name: str) -> None: ...


def check_name(name: str) -> str:
    """An object name is one plain path component: never a way out of the store."""
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise ValueError(f"{name!r} is not a backup name in a repository")
    return name


class LocalStore:
    """A directory: objects are files, written to a temp name and renamed when complete."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def objects(self) -> dict[str, datetime]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"no repository at {self.root}: the directory does not exist")
        return {
            p.name: datetime.fromtimestamp(p.stat().st_mtime, UTC)
            for p in self.root.iterdir()
            if not p.name.startswith(".") and p.is_file()
        }

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name)).exists()

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        dest = self.root / check_name(name)
        if dest.exists():
            raise FileExistsError(f"{dest} exists; a repository never overwrites a backup")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            yield out

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        with open(self.root / check_name(name), "rb") as f:
            yield f

    def delete(self, name: str) -> None:
        (self.root / check_name(name)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
