"""SQLite uploads are files from strangers.

What a hostile uploader could try, and what stops it:
- a schema built to be slow (an index whose expression costs seconds per row) so
  that the integrity check holds the restore lock: the checks run under a
  deadline (--inspect-timeout) and the upload is refused when it passes;
- a schema that calls functions with side effects: trusted_schema is off;
- a header that switches the live database's journal mode (a WAL-mode file into a
  rollback-journal database): the live database keeps its mode;
- payloads inside well-formed frames: see test_malformed_streams.py.
Each row checks the database content afterwards.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, make_sqlite_db
from helpers import error_reason, frames, raw_restore, sqlite_content, start_server

from safehold.v1 import backup_service_pb2 as pb


def slow_index_db(path: Path, rows: int) -> Path:
    """A valid database whose index expression takes milliseconds per row. The index
    is built with a cheap expression of the same value (x * 2), then its definition
    is swapped for the slow one: a stranger can write any schema text into a file,
    and this one passes the integrity check, slowly."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
        db.executemany("INSERT INTO t VALUES (?)", [(2_000_000,)] * rows)
        db.execute("CREATE INDEX slow ON t (x * 2)")
        db.execute("PRAGMA writable_schema = ON")
        db.execute(
            "UPDATE sqlite_schema SET sql = "
            "'CREATE INDEX slow ON t (length(hex(zeroblob(x))))' WHERE name = 'slow'"
        )
    return path


def test_an_upload_built_to_be_slow_is_refused_within_the_bound(
    tmp_path: Path, sqlite_db: Path
) -> None:
    upload = slow_index_db(tmp_path / "slow.sqlite", rows=5_000).read_bytes()
    before = sqlite_content(sqlite_db)
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--inspect-timeout", "2")
    try:
        started = time.monotonic()
        _, err = raw_restore(server, frames(upload, engine=pb.ENGINE_SQLITE))
        elapsed = time.monotonic() - started

        assert err is not None
        assert error_reason(err) == (grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP", "UNCHANGED")
        assert "--inspect-timeout" in str(err.details())
        # unbounded, the check takes over a minute here; the bound is 2 s plus upload
        assert elapsed < 15, elapsed
        assert sqlite_content(sqlite_db) == before
        # the restore lock is free again: a good upload goes through at once
        good = make_sqlite_db(tmp_path / "good.sqlite").read_bytes()
        _, err = raw_restore(server, frames(good, engine=pb.ENGINE_SQLITE))
        assert err is None, err.details()
    finally:
        server.stop()


@pytest.mark.parametrize(("live_wal", "upload_wal"), [(False, True), (True, False)])
def test_a_restore_keeps_the_live_journal_mode(
    live_wal: bool, upload_wal: bool, tmp_path: Path
) -> None:
    live = make_sqlite_db(tmp_path / "live.sqlite", wal=live_wal)
    upload_path = make_sqlite_db(tmp_path / "upload.sqlite", wal=upload_wal)
    with sqlite3.connect(upload_path) as db:
        db.execute("INSERT INTO games (title) VALUES ('only in the upload')")
    with sqlite3.connect(upload_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = upload_path.read_bytes()
    assert data[18] == (2 if upload_wal else 1)
    mode = "wal" if live_wal else "delete"
    holder = sqlite3.connect(live)  # the application's connection, open across the restore
    server = start_server(tmp_path, f"sqlite:///{live}", PASSWORD)
    try:
        _, err = raw_restore(server, frames(data, engine=pb.ENGINE_SQLITE))
        assert err is None, err.details()
    finally:
        server.stop()
    with sqlite3.connect(live) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == (mode,)
    assert holder.execute(
        "SELECT count(*) FROM games WHERE title = 'only in the upload'"
    ).fetchone() == (1,)
    assert holder.execute("PRAGMA journal_mode").fetchone() == (mode,)
    holder.close()
