"""SQLite's replace and its checks at their edges: a database locked by a
reader, 64 KiB pages, and uploads that start like SQLite but are not whole."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, make_sqlite_db
from helpers import (
    altered_copy,
    error_reason,
    frames,
    raw_restore,
    sqlite_content,
    start_server,
    wait_until_writing,
)

from safehold.v1 import backup_service_pb2 as pb


def _reader(db: Path) -> sqlite3.Connection:
    """A read transaction on db: a writer must wait until it ends."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM games").fetchall()
    return conn


def test_restore_waits_for_a_reader_then_replaces(sqlite_db: Path, tmp_path: Path) -> None:
    data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--lock-timeout", "60")
    try:
        reader = _reader(sqlite_db)
        outcome: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
        runner = threading.Thread(target=lambda: outcome.append(raw_restore(server, frames(data))))
        runner.start()
        wait_until_writing(sqlite_db, server.process.pid)  # it waits, not gives up
        reader.close()
        runner.join(60)
    finally:
        server.stop()
    ((_, err),) = outcome
    assert err is None, err
    assert sqlite_content(sqlite_db) == sqlite_content(tmp_path / "upload.sqlite")


def test_restore_locked_past_the_lock_timeout_is_busy(sqlite_db: Path, tmp_path: Path) -> None:
    data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")
    before = sqlite_content(sqlite_db)
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--lock-timeout", "1")
    reader = _reader(sqlite_db)
    try:
        _, err = raw_restore(server, frames(data))
    finally:
        reader.close()
        server.stop()
    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_BUSY", "UNCHANGED")
    assert sqlite_content(sqlite_db) == before


@pytest.mark.parametrize("page_size", [512, 65536])
def test_databases_with_the_smallest_and_largest_pages_round_trip(
    page_size: int, sqlite_db: Path, tmp_path: Path
) -> None:
    pages = tmp_path / f"pages-{page_size}.sqlite"
    with sqlite3.connect(pages) as conn:
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("CREATE TABLE games (id INTEGER PRIMARY KEY, title TEXT)")
        conn.execute("INSERT INTO games (title) VALUES (?)", [f"{page_size} bytes a page"])
    # SQLite writes 65536 as 1 in its header.
    assert pages.read_bytes()[16:18] == (page_size if page_size < 65536 else 1).to_bytes(2, "big")
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        _, err = raw_restore(server, frames(pages.read_bytes()))
    finally:
        server.stop()
    assert err is None, err
    assert sqlite_content(sqlite_db) == sqlite_content(pages)


def _cut(whole: bytes) -> bytes:
    return whole[: len(whole) - 100]


def _garbage_pages(whole: bytes) -> bytes:
    return whole[:100] + os.urandom(4096 * 3 - 100)


@pytest.mark.parametrize(
    ("damage", "says"),
    [(_cut, "looks truncated"), (_garbage_pages, "not a usable SQLite database")],
    ids=["cut-mid-page", "garbage-pages"],
)
def test_upload_that_starts_like_sqlite_but_is_not_whole(
    damage: Callable[[bytes], bytes], says: str, sqlite_db: Path, tmp_path: Path
) -> None:
    source = make_sqlite_db(tmp_path / "source.sqlite")  # 4096-byte pages, the default
    upload = damage(source.read_bytes())
    before = sqlite_content(sqlite_db)
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        _, err = raw_restore(server, frames(upload))
    finally:
        server.stop()
    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP", "UNCHANGED")
    assert says in (err.details() or "")
    assert sqlite_content(sqlite_db) == before
