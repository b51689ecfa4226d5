"""Recognising backup artefacts from their first bytes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from safehold.formats import engine_of, sniff
from safehold.v1 import backup_service_pb2 as pb


def test_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    assert sniff(path.read_bytes()) == pb.DUMP_FORMAT_SQLITE_FILE
    assert engine_of(pb.DUMP_FORMAT_SQLITE_FILE) == pb.ENGINE_SQLITE


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"PGDMP\x01\x0e\x00", pb.DUMP_FORMAT_PG_CUSTOM),
        (b"toc.dat".ljust(257, b"\x00") + b"ustar\x0000", pb.DUMP_FORMAT_PG_TAR),
        (b"--\n-- PostgreSQL database dump\n--\n", pb.DUMP_FORMAT_PG_PLAIN),
        (b"\n\nCREATE TABLE t (x int);\n", pb.DUMP_FORMAT_PG_PLAIN),
        (b"SQLite format 2\x00", pb.DUMP_FORMAT_UNSPECIFIED),
        (b"", pb.DUMP_FORMAT_UNSPECIFIED),
        (b"not a backup at all", pb.DUMP_FORMAT_UNSPECIFIED),
        (b"other.dat".ljust(257, b"\x00") + b"ustar\x0000", pb.DUMP_FORMAT_UNSPECIFIED),
    ],
)
def test_heads(head: bytes, fmt: int) -> None:
    assert sniff(head) == fmt


def test_random_bytes_are_nothing() -> None:
    for _ in range(200):
        data = os.urandom(512)
        if not data.startswith((b"PGDMP", b"SQLite format 3\x00")):
            assert sniff(data) == pb.DUMP_FORMAT_UNSPECIFIED
