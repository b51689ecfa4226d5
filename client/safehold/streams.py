"""Readers and writers that hash what passes through them, and check it at the end.

Shared by the client (backup and restore streams) and the repositories.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

COPY_CHUNK = 1024 * 1024


class HashingReader(io.RawIOBase):
    """Reads inner, counting and hashing; on_end(size, sha256 hex) runs at its end and
    may raise, so that a reader never sees a clean EOF from bytes that do not match.
    Remembers the error it raised (pyrage wraps errors of the streams it reads).
    """

    def __init__(self, inner: BinaryIO, on_end: Callable[[int, str], None] | None = None) -> None:
        self._inner = inner
        self._on_end = on_end
        self._digest = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._inner.read(len(buffer))
            if not data:
                if self._on_end:
                    self._on_end(self.size, self.sha256)
                return 0
        except BaseException as err:
            self.error = err
            raise
        self._digest.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)


class HashingWriter(io.RawIOBase):
    """Writes to inner, counting and hashing."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._digest = hashlib.sha256()
        self.size = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._inner.write(data)
        self._digest.update(data)
        self.size += len(data)
        return len(data)


def expecting(
    size: int, sha256: str, fail: Callable[[str], BaseException]
) -> Callable[[int, str], None]:
    """An on_end check that raises fail(what differs) unless size and SHA-256 match."""

    def check(actual_size: int, actual_sha256: str) -> None:
        if actual_size != size:
            raise fail(f"{actual_size} bytes instead of {size}")
        if not hmac.compare_digest(actual_sha256, sha256):
            raise fail(f"SHA-256 {actual_sha256} instead of {sha256}")

    return check


class ChunksReader(io.RawIOBase):
    """An iterator of byte chunks as a raw stream, for consumers that read (copyfileobj,
    pyrage). An exception from the iterator is raised from read()."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def as_binary(raw: io.RawIOBase) -> BinaryIO:
    """A raw stream as the BinaryIO that readers and copyfileobj expect."""
    return io.BufferedReader(raw, COPY_CHUNK)


def read_head(stream: BinaryIO, size: int) -> bytes:
    """Up to size bytes from the start of a stream that may return short reads."""
    head = b""
    while len(head) < size and (data := stream.read(size - len(head))):
        head += data
    return head
