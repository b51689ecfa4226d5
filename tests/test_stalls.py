"""Calls that stall or wait on the application's locks end, bounded, and free
what they held: a backup client that stops reading, and pg_dump behind a lock."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, PgDatabase
from helpers import (
    Server,
    add_filler,
    children_named,
    sqlite_content,
    start_server,
)

from safehold.client import Busy, Client
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

STALL = 2.0
LOCK_TIMEOUT = 3.0


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.05)


def stall_a_backup(server: Server) -> grpc.Channel:
    """Start a backup, read its manifest and then nothing more; the caller
    closes the returned channel. Returns once the server has ended the call."""
    channel = grpc.insecure_channel(server.target)
    call = pb_grpc.BackupServiceStub(channel).Backup(
        pb.BackupRequest(compression_level=0), metadata=server.metadata()
    )
    assert next(iter(call)).WhichOneof("frame") == "manifest"
    wait_for(
        lambda: "received nothing for 2s: ending its stream" in server.log(),
        STALL + 30,
        "the server ends the stalled backup",
    )
    wait_for(lambda: "backup stalled after" in server.log(), 10, "the backup cleans up")
    return channel


def test_stalled_sqlite_backup_is_ended_and_restores_go_ahead(
    tmp_path: Path, sqlite_db: Path
) -> None:
    add_filler(sqlite_db, 40)  # more than gRPC and the sockets buffer
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--stall-timeout", "2")
    try:
        with Client(server.target, PASSWORD) as client:
            saved = client.backup(tmp_path / "saved.sqlite")
            expected = sqlite_content(sqlite_db)
            channel = stall_a_backup(server)
            try:
                with sqlite3.connect(sqlite_db) as db:
                    db.execute("ALTER TABLE games ADD COLUMN rating INTEGER")
                client.restore(saved.path)  # the backup no longer holds the gate
                assert sqlite_content(sqlite_db) == expected
                assert list((server.data_dir / "spool").glob("safehold-snapshot-*")) == []
            finally:
                channel.close()
    finally:
        server.stop()


def test_stalled_postgres_backup_is_ended_and_ddl_and_restore_go_ahead(
    tmp_path: Path, pg_db: PgDatabase
) -> None:
    pg_db.execute(
        "CREATE TABLE big AS SELECT i, md5(i::text) || repeat('x', 500) AS t "
        "FROM generate_series(1, 80000) i"  # about 40 MB uncompressed
    )
    server = start_server(
        tmp_path, pg_db.url, PASSWORD, "--stall-timeout", "2", "--lock-timeout", "3"
    )
    try:
        with Client(server.target, PASSWORD) as client:
            saved = client.backup(tmp_path / "saved.dump")
            channel = stall_a_backup(server)
            try:
                wait_for(
                    lambda: not children_named(server.process.pid, "pg_dump"),
                    10,
                    "pg_dump is killed",
                )
                with pg_db.connect() as app:
                    app.execute("SET lock_timeout = '2s'")
                    app.execute("ALTER TABLE big ADD COLUMN rating int")  # needs ACCESS EXCLUSIVE
                client.restore(saved.path)
                with pg_db.connect() as app:
                    columns = app.execute(
                        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'big'"
                    ).fetchone()
                    assert columns == (2,)  # the restore put the table back as saved
            finally:
                channel.close()
    finally:
        server.stop()


def test_pg_dump_behind_an_access_exclusive_lock_is_database_busy(
    tmp_path: Path, pg_db: PgDatabase
) -> None:
    """A backup and a restore (its pre-restore backup) each give up after the
    lock timeout, name the session that holds the lock, and change nothing."""
    pg_db.execute('CREATE TABLE "held table" (x int); INSERT INTO "held table" VALUES (1), (2)')
    server = start_server(tmp_path, pg_db.url, PASSWORD, "--lock-timeout", str(LOCK_TIMEOUT))
    try:
        with Client(server.target, PASSWORD, attempts=1) as client:
            saved = client.backup(tmp_path / "saved.dump")
            pg_db.execute('INSERT INTO "held table" VALUES (3)')
            with pg_db.connect() as holder:
                holder.autocommit = False
                holder.execute('LOCK TABLE "held table" IN ACCESS EXCLUSIVE MODE')
                pid = holder.info.backend_pid
                for attempt in (
                    lambda: client.backup(tmp_path / "blocked.dump"),
                    lambda: client.restore(saved.path),
                ):
                    started = time.monotonic()
                    with pytest.raises(Busy) as raised:
                        attempt()
                    waited = time.monotonic() - started
                    assert raised.value.reason == "DATABASE_BUSY"
                    assert (
                        f'lock on public."held table": held by session {pid} '
                        in raised.value.message
                    )
                    assert LOCK_TIMEOUT <= waited < LOCK_TIMEOUT + 5, waited
                holder.rollback()
            assert not (tmp_path / "blocked.dump").exists()
            with pg_db.connect() as app:
                assert app.execute('SELECT count(*) FROM "held table"').fetchone() == (3,)
    finally:
        server.stop()
