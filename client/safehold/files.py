"""Writing a file so that it is either complete or absent.

Pre-restore backups and snapshots are written to a private temp name beside
their destination and renamed only once complete and synced, as etcd and
Litestream do: a crash never leaves a half file under the real name. The
client's backups go one step further (UnnamedFile): the file has no name at
all until it is verified, so a client killed half-way leaves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

PARTIAL_MARK = ".safehold-partial-"
"""In the hidden names of files being written where O_TMPFILE is not available."""


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


class UnnamedFile:
    """A new file (0600) in a directory that gets a name only through link().

    Linux O_TMPFILE, named with linkat(/proc/self/fd/N): until then no name
    exists, and a writer killed (even by SIGKILL) leaves nothing. new_file()
    falls back to PartialFile where the filesystem cannot. Use it as a context
    manager; leaving it takes away everything that link() did not name.
    """

    def __init__(self, directory: Path, hint: str) -> None:
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = self._create(hint)
        except OSError:
            os.close(self._dir_fd)
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)  # a PartialFile's name is in use while locked
        self.file = os.fdopen(fd, "wb")

    def _create(self, hint: str) -> int:
        return os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600, dir_fd=self._dir_fd)

    def _source(self) -> tuple[str, int | None]:
        """What link() hard-links from: path and the directory it is relative to."""
        return f"/proc/self/fd/{self.file.fileno()}", None

    def __enter__(self) -> UnnamedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.file.close()
        self._remove_own_name()
        os.close(self._dir_fd)

    def _remove_own_name(self) -> None:
        """An O_TMPFILE file has no name of its own: closing it was enough."""

    def link(self, name: str, *, replace: bool = False) -> bool:
        """Sync the file and give it `name` in the directory. Without replace an
        existing name is never touched and the answer is False."""
        self.file.flush()
        os.fsync(self.file.fileno())
        source, source_dir = self._source()
        target = f".{name}{PARTIAL_MARK}{secrets.token_hex(6)}" if replace else name
        try:
            os.link(source, target, src_dir_fd=source_dir, dst_dir_fd=self._dir_fd)
        except FileExistsError:
            return False
        if replace:
            os.replace(target, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        os.fsync(self._dir_fd)
        return True

    def unlink(self, name: str) -> None:
        """Take back a name this file was given by link()."""
        os.unlink(name, dir_fd=self._dir_fd)


class PartialFile(UnnamedFile):
    """UnnamedFile for filesystems without O_TMPFILE: the file is named
    `.<hint>.safehold-partial-<random>` and locked (flock) while its writer
    lives; a killed writer's file is deleted by remove_stale_partials() later."""

    def _create(self, hint: str) -> int:
        self._partial = f".{hint}{PARTIAL_MARK}{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        return os.open(self._partial, flags, 0o600, dir_fd=self._dir_fd)

    def _source(self) -> tuple[str, int | None]:
        return self._partial, self._dir_fd

    def _remove_own_name(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial, dir_fd=self._dir_fd)


def new_file(directory: Path, hint: str) -> UnnamedFile:
    """An UnnamedFile in directory, or a PartialFile where O_TMPFILE is not supported."""
    try:
        return UnnamedFile(directory, hint)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        return PartialFile(directory, hint)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Delete PartialFile's files in directory whose writer has died;
    one still being written (its lock held) is left alone."""
    removed = []
    for path in directory.glob(f".*{PARTIAL_MARK}*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
