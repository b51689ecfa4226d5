"""Writing a file so that it is either complete or absent.

Backups, pre-restore backups and snapshots are all written to a private temp
name beside their destination and renamed only once complete and synced, as
etcd and Litestream do: a crash never leaves a half file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def private_temp_file(directory: Path, prefix: str) -> Path:
    """A new empty file only the owner can read (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.close(fd)
    return Path(name)


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.partial-"


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temp path to fill; renamed to dest when the block succeeds, removed if not."""
    tmp = private_temp_file(dest.parent, _partial_prefix(dest))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partials(dest: Path) -> list[Path]:
    """Delete the temp files a killed process left while writing dest."""
    if not dest.parent.is_dir():
        return []
    removed = [p for p in dest.parent.glob(_partial_prefix(dest) + "*") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
