"""Promises about what happens while a replace is under way, shown with the
server held inside the replace by a lock the test holds, never by a clock."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
from conftest import PASSWORD, PgDatabase, new_pg_database
from helpers import (
    Server,
    frames,
    raw_restore,
    sqlite_content,
    start_server,
    wait_until_writing,
)
from pg import Cluster

from safehold.client import Client
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc


def _wait_for_log(server: Server, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)


def test_sigterm_during_a_replace_lets_it_finish(sqlite_db: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--shutdown-grace", "60")
    try:
        with Client(server.target, PASSWORD) as client:
            backup = client.backup(tmp_path / "b.sqlite").path
        with sqlite3.connect(sqlite_db) as conn:
            conn.execute("UPDATE games SET title = 'changed after the backup'")
        new = sqlite_content(backup)
        assert sqlite_content(sqlite_db) != new

        reader = sqlite3.connect(sqlite_db, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM games").fetchall()  # the replace must wait
        outcome: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
        runner = threading.Thread(
            target=lambda: outcome.append(raw_restore(server, frames(backup.read_bytes())))
        )
        runner.start()
        wait_until_writing(sqlite_db, server.process.pid)  # the replace is under way
        server.process.send_signal(signal.SIGTERM)
        _wait_for_log(server, "stopping")
        reader.close()
        runner.join(60)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    ((responses, err),) = outcome
    assert err is None, err
    assert responses[-1].WhichOneof("frame") == "result"
    assert sqlite_content(sqlite_db) == new
    log = server.log()
    assert log.index("stopping") < log.index("restore finished")


def _count(db: PgDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
    assert row is not None
    return int(row[0])


def test_backup_during_a_restore_waits_and_sees_the_restored_database(
    pg_cluster: Cluster, pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000);")
    server = start_server(tmp_path, pg_db.url, PASSWORD, "--lock-timeout", "60")
    try:
        with Client(server.target, PASSWORD) as client:
            archive = client.backup(tmp_path / "a.dump").path
        pg_db.execute("INSERT INTO t SELECT generate_series(1001, 1500)")

        holder = pg_db.connect()
        holder.autocommit = False
        holder.execute("SELECT count(*) FROM t")  # the replace waits for this lock
        restored: list[grpc.RpcError | None] = []
        runner = threading.Thread(
            target=lambda: restored.append(raw_restore(server, frames(archive.read_bytes()))[1])
        )
        runner.start()
        _wait_for_log(server, "restore phase RESTORING")
        with server.channel() as channel:
            call = pb_grpc.BackupServiceStub(channel).Backup(
                pb.BackupRequest(), metadata=server.metadata()
            )
            call.initial_metadata()  # returns once the server has the call
            holder.rollback()  # now the replace can go on
            holder.close()
            taken = tmp_path / "during.dump"
            taken.write_bytes(b"".join(r.chunk for r in call))
        runner.join(60)
    finally:
        server.stop()
    assert restored == [None]
    assert _count(pg_db) == 1000
    log = server.log()
    during = log.index("restore started")
    assert log.index("restore finished") < log.index("backup of", during)
    # The backup taken during the restore holds the restored database, whole.
    copy = new_pg_database(pg_cluster)
    subprocess.run(
        ["pg_restore", "--no-owner", "--no-privileges", "-d", copy.name, str(taken)],
        env={**pg_cluster.env(), "PGUSER": copy.role, "PGPASSWORD": copy.password},
        check=True,
    )
    assert _count(copy) == 1000
