"""Reading what a pg_dump artefact says about itself, without pg_restore.

The custom format's header (also toc.dat, the first member of a tar archive)
names the archive format version, the source server's version and the
pg_dump version; a plain script says the same in its opening comments. The
restore checks these before it touches anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safehold.formats import sniff
from safehold.v1 import backup_service_pb2 as pb

_TAR_BLOCK = 512
_PLAIN_SERVER = re.compile(rb"^-- Dumped from database version (\S+)", re.MULTILINE)
_PLAIN_PG_DUMP = re.compile(rb"^-- Dumped by pg_dump version (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class DumpHeader:
    """What an artefact says about where it came from; None where it does not say."""

    dump_format: pb.DumpFormat.ValueType
    archive_version: str | None
    server_version: str | None
    pg_dump_version: str | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.int_size = 4

    def byte(self) -> int:
        if self._pos >= len(self._data):
            raise ValueError("header ends early")
        self._pos += 1
        return self._data[self._pos - 1]

    def integer(self) -> int:
        """pg_dump's ReadInt: a sign byte, then int_size bytes, least significant first."""
        negative = self.byte()
        value = 0
        for shift in range(self.int_size):
            value |= self.byte() << (8 * shift)
        return -value if negative else value

    def string(self) -> str | None:
        length = self.integer()
        if length < 0:
            return None
        end = self._pos + length
        if end > len(self._data):
            raise ValueError("header ends early")
        text = self._data[self._pos : end].decode("utf-8", "replace")
        self._pos = end
        return text


def read_header(head: bytes) -> DumpHeader:
    """Parse the start of a pg_dump artefact (custom, tar or plain).

    Raises ValueError when the bytes claim a format but its header is broken.
    """
    fmt = sniff(head)
    if fmt == pb.DUMP_FORMAT_PG_PLAIN:
        server = _PLAIN_SERVER.search(head)
        dump = _PLAIN_PG_DUMP.search(head)
        return DumpHeader(
            fmt,
            None,
            server.group(1).decode() if server else None,
            dump.group(1).decode() if dump else None,
        )
    if fmt == pb.DUMP_FORMAT_PG_TAR:
        head = head[_TAR_BLOCK:]
    if not head.startswith(b"PGDMP"):
        raise ValueError("no pg_dump archive header")
    return _read_custom(fmt, head)


def _read_custom(fmt: pb.DumpFormat.ValueType, head: bytes) -> DumpHeader:
    """Follow ReadHead() in pg_backup_archiver.c for archive versions 1.10 and later."""
    r = _Reader(head[5:])
    major, minor = r.byte(), r.byte()
    revision = r.byte() if major > 1 or minor > 0 else 0
    version = (major, minor)
    archive_version = f"{major}.{minor}.{revision}"
    if version < (1, 10):
        return DumpHeader(fmt, archive_version, None, None)
    r.int_size = r.byte()
    if not 1 <= r.int_size <= 8:
        raise ValueError(f"impossible integer size {r.int_size} in archive header")
    r.byte()  # offset size
    r.byte()  # format
    if version >= (1, 15):
        r.byte()  # compression algorithm
    else:
        r.integer()  # compression level
    for _ in range(7):  # creation time: sec, min, hour, day, month, year, isdst
        r.integer()
    r.string()  # database name
    server_version = r.string()
    pg_dump_version = r.string()
    return DumpHeader(fmt, archive_version, server_version, pg_dump_version)


def major_of(version: str) -> tuple[int, int]:
    """The major version of a PostgreSQL version string, comparable across the
    numbering change: '15.4' -> (15, 0), '9.6.3' -> (9, 6)."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if not match:
        raise ValueError(f"not a PostgreSQL version: {version!r}")
    major = int(match.group(1))
    return (major, int(match.group(2) or 0)) if major < 10 else (major, 0)
