"""Where `safehold backup` writes: the one place that turns `-o` into a destination.

- `-`, or an existing special file (a FIFO, /dev/stdout on a pipe): a stream,
  written as the bytes arrive, never replaced;
- a value ending in `/`, or naming a directory: a directory (created 0700 when
  missing) in which the server's suggested name is made safe and free: it
  never leaves the directory and never replaces a file;
- anything else: the file the user named, replaced only with force.

Files and directories get the backup plus a sidecar named after it
(`<file>.manifest.json`); a repository (s3://…) is to be routed from plan() too.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from safehold.client.errors import SafeholdError
from safehold.files import UnnamedFile, new_file, remove_stale_partials

SIDECAR_SUFFIX = ".manifest.json"
STDOUT = "-"
MAX_FREE_NAME_TRIES = 1000
_MAX_NAME_CHARS = 200
_FALLBACK_STEM = "safehold-backup"


class OutputRefused(SafeholdError):
    """The destination cannot be written without destroying something; nothing was saved."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="OUTPUT_REFUSED")


class Kind(enum.Enum):
    STREAM = "stream"
    DIRECTORY = "directory"
    FILE = "file"


@dataclass(frozen=True)
class Destination:
    """A decided output: what kind, where, and whether a user-named file may be replaced."""

    kind: Kind
    path: Path
    force: bool = False

    @property
    def streams(self) -> bool:
        """Bytes go out as they arrive and cannot be taken back."""
        return self.kind is Kind.STREAM


def plan(spec: str | os.PathLike[str], *, force: bool = False) -> Destination:
    """Decide what `-o spec` means, and refuse before anything is downloaded
    what could only end by replacing a file the user did not allow to replace."""
    text = os.fspath(spec)
    if text == STDOUT:
        return Destination(Kind.STREAM, Path(STDOUT))
    path = Path(text)
    if text.endswith(os.sep) or path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Destination(Kind.DIRECTORY, path)
    if path.exists() and not path.is_file():
        return Destination(Kind.STREAM, path)
    if not path.parent.is_dir():
        raise OutputRefused(f"cannot save to {path}: there is no directory {path.parent}")
    if not force:
        for existing in (path, sidecar_of(path)):
            if existing.exists():
                raise OutputRefused(
                    f"{existing} exists; pass --force to replace it, or choose another -o"
                )
    return Destination(Kind.FILE, path, force)


def sidecar_of(path: Path) -> Path:
    """The JSON that describes the backup at path."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def safe_name(suggested: str, suffix: str) -> str:
    """A file name from the server's suggestion that cannot leave the directory
    (no separators, no leading dot, no control characters) and ends in suffix."""
    name = suggested.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c if c.isprintable() else "_" for c in name).lstrip(". ")
    stem = name.removesuffix(suffix)[:_MAX_NAME_CHARS] or _FALLBACK_STEM
    return stem + suffix


class Sink(Protocol):
    """Where the verified bytes of one backup go."""

    def write(self, chunk: bytes) -> None: ...

    def commit(self, sidecar: bytes) -> Path:
        """Put the complete backup (and its sidecar) in place; the path it got."""
        ...


@contextlib.contextmanager
def open_sink(dest: Destination, suggested_name: str, suffix: str) -> Iterator[Sink]:
    """A sink for dest; leaving without commit() leaves nothing behind."""
    if dest.kind is Kind.STREAM:
        with _open_stream(dest.path) as stream:
            yield _StreamSink(stream, dest.path)
        return
    directory = dest.path if dest.kind is Kind.DIRECTORY else dest.path.parent
    remove_stale_partials(directory)
    name = safe_name(suggested_name, suffix) if dest.kind is Kind.DIRECTORY else dest.path.name
    with new_file(directory, name) as file:
        if dest.kind is Kind.DIRECTORY:
            yield _FreeNameSink(file, directory, name, suffix)
        else:
            yield _NamedFileSink(file, dest)


@contextlib.contextmanager
def _open_stream(path: Path) -> Iterator[BinaryIO]:
    if str(path) == STDOUT:
        sys.stdout.flush()
        with open(sys.stdout.fileno(), "wb", closefd=False) as stdout:
            yield stdout
        return
    # Append, not truncate or replace: a FIFO or device stays what it is.
    with open(path, "ab") as stream:
        yield stream


class _StreamSink:
    """Bytes straight through; there is no file to put a sidecar beside."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self._stream = stream
        self._path = path

    def write(self, chunk: bytes) -> None:
        self._stream.write(chunk)

    def commit(self, sidecar: bytes) -> Path:
        self._stream.flush()
        return self._path


class _NamedFileSink:
    """The file the user named; replaced only with force."""

    def __init__(self, file: UnnamedFile, dest: Destination) -> None:
        self._file = file
        self._dest = dest

    def write(self, chunk: bytes) -> None:
        self._file.file.write(chunk)

    def commit(self, sidecar: bytes) -> Path:
        path = self._dest.path
        if not self._file.link(path.name, replace=self._dest.force):
            raise OutputRefused(f"{path} appeared while the backup was running; it was kept")
        _link_sidecar(path, sidecar, replace=True)
        return path


class _FreeNameSink:
    """The server's (made safe) name in a directory, or the first free variant of it."""

    def __init__(self, file: UnnamedFile, directory: Path, name: str, suffix: str) -> None:
        self._file = file
        self._directory = directory
        self._name = name
        self._suffix = suffix

    def write(self, chunk: bytes) -> None:
        self._file.file.write(chunk)

    def commit(self, sidecar: bytes) -> Path:
        stem = self._name.removesuffix(self._suffix)
        for n in range(MAX_FREE_NAME_TRIES):
            name = f"{stem}-{n}{self._suffix}" if n else self._name
            if not self._file.link(name):
                continue
            path = self._directory / name
            if _link_sidecar(path, sidecar, replace=False):
                return path
            self._file.unlink(name)  # an orphan sidecar holds this name: try the next
        raise OutputRefused(
            f"no free name like {self._name} in {self._directory} after "
            f"{MAX_FREE_NAME_TRIES} tries; nothing was saved"
        )


def _link_sidecar(path: Path, content: bytes, *, replace: bool) -> bool:
    sidecar = sidecar_of(path)
    with new_file(sidecar.parent, sidecar.name) as file:
        file.file.write(content)
        return file.link(sidecar.name, replace=replace)
