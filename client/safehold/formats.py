"""Recognise a backup artefact from its first bytes.

The server refuses an upload of the wrong engine before it touches the
database, and the client refuses to upload one at all; both ask this module so
that they agree on what a file is.
"""

from __future__ import annotations

import re
from typing import BinaryIO

from safehold.v1 import backup_service_pb2 as pb

SNIFF_BYTES = 4096
"""How much of the start of a file is enough to recognise every format."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_PG_CUSTOM_MAGIC = b"PGDMP"
_TAR_MAGIC_OFFSET = 257
# pg_dump's tar archives start with toc.dat; GNU and POSIX tar both say "ustar".
_TAR_MAGIC = b"ustar"
_PG_PLAIN = re.compile(
    rb"\A(\xef\xbb\xbf)?\s*(--[^\n]*\n\s*)*--\s*PostgreSQL database (dump|cluster dump)",
)
_SQL_START = re.compile(
    rb"\A(\xef\xbb\xbf)?\s*(--[^\n]*\n\s*)*"
    rb"(SET|SELECT|CREATE|BEGIN|DROP|ALTER|INSERT|COPY|COMMENT|\\connect|\\restrict)\b",
    re.IGNORECASE,
)


def sniff(head: bytes) -> pb.DumpFormat.ValueType:
    """The dump format that `head` (the first SNIFF_BYTES of a file) starts.

    Returns DUMP_FORMAT_UNSPECIFIED for anything that is no backup at all.
    """
    if head.startswith(_SQLITE_MAGIC):
        return pb.DUMP_FORMAT_SQLITE_FILE
    if head.startswith(_PG_CUSTOM_MAGIC):
        return pb.DUMP_FORMAT_PG_CUSTOM
    if head[
        _TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + len(_TAR_MAGIC)
    ] == _TAR_MAGIC and head.startswith(b"toc.dat\x00"):
        return pb.DUMP_FORMAT_PG_TAR
    if _PG_PLAIN.match(head) or _SQL_START.match(head):
        return pb.DUMP_FORMAT_PG_PLAIN
    return pb.DUMP_FORMAT_UNSPECIFIED


def sniff_file(stream: BinaryIO) -> pb.DumpFormat.ValueType:
    """sniff() the start of an open file, leaving its position at the start."""
    stream.seek(0)
    head = stream.read(SNIFF_BYTES)
    stream.seek(0)
    return sniff(head)


def engine_of(fmt: pb.DumpFormat.ValueType) -> pb.Engine.ValueType:
    """The engine whose tools read a dump format."""
    if fmt == pb.DUMP_FORMAT_SQLITE_FILE:
        return pb.ENGINE_SQLITE
    if fmt in (pb.DUMP_FORMAT_PG_CUSTOM, pb.DUMP_FORMAT_PG_TAR, pb.DUMP_FORMAT_PG_PLAIN):
        return pb.ENGINE_POSTGRESQL
    return pb.ENGINE_UNSPECIFIED


def file_suffix(fmt: pb.DumpFormat.ValueType) -> str:
    """The file name suffix a backup of this format is saved with."""
    return {
        pb.DUMP_FORMAT_SQLITE_FILE: ".sqlite",
        pb.DUMP_FORMAT_PG_CUSTOM: ".dump",
        pb.DUMP_FORMAT_PG_TAR: ".tar",
        pb.DUMP_FORMAT_PG_PLAIN: ".sql",
    }.get(fmt, ".backup")


def engine_label(engine: pb.Engine.ValueType) -> str:
    """A short human name for an engine, for messages."""
    return {pb.ENGINE_POSTGRESQL: "PostgreSQL", pb.ENGINE_SQLITE: "SQLite"}.get(engine, "unknown")
