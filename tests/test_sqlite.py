"""The SQLite engine end to end: consistent backups, exact restores, live connections."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PASSWORD, make_sqlite_db
from helpers import Server, spool_leftovers, sqlite_content, start_server

from safehold.client import Client, Progress


def test_backup_under_concurrent_writes_is_consistent(
    client: Client, sqlite_db: Path, tmp_path: Path
) -> None:
    with sqlite3.connect(sqlite_db) as db:
        db.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount INTEGER)")
        db.execute("CREATE TABLE totals (n INTEGER, sum INTEGER)")
        db.execute("INSERT INTO totals VALUES (0, 0)")
    stop = threading.Event()
    written = [0]

    def keep_writing() -> None:
        # Each transaction adds a row and updates the totals: a consistent
        # snapshot always has totals matching the ledger.
        with sqlite3.connect(sqlite_db, timeout=30) as db:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and written[0] < 100_000:
                with db:
                    db.execute("INSERT INTO ledger (amount) VALUES (?)", (written[0] % 97,))
                    db.execute("UPDATE totals SET n = n + 1, sum = sum + ?", (written[0] % 97,))
                written[0] += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        while written[0] < 50:
            time.sleep(0.01)
        result = client.backup(tmp_path / "during-writes.sqlite")
        after_backup = written[0]
    finally:
        stop.set()
        writer.join()
    assert after_backup > 50
    check = subprocess.run(
        [
            "sqlite3",
            str(result.path),
            "PRAGMA integrity_check;",
            "SELECT (SELECT count(*) FROM ledger) = n AND "
            "(SELECT coalesce(sum(amount), 0) FROM ledger) = sum FROM totals;",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.split() == ["ok", "1"]
    assert written[0] > after_backup or written[0] >= 100_000  # the app kept writing


def test_round_trip_restores_exactly_and_drops_new_objects(
    client: Client, sqlite_db: Path, tmp_path: Path
) -> None:
    original = sqlite_content(sqlite_db)
    backup = client.backup(tmp_path / "backup.sqlite")
    with sqlite3.connect(sqlite_db) as db:
        db.execute("UPDATE games SET title = 'changed' WHERE id < 50")
        db.execute("DELETE FROM progress WHERE game_id > 100")
        db.execute("CREATE TABLE added_later (x)")
    assert sqlite_content(sqlite_db) != original

    result = client.restore(backup.path)

    assert sqlite_content(sqlite_db) == original
    with sqlite3.connect(sqlite_db) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert "added_later" not in tables
    assert result.bytes_restored == backup.size_bytes


def test_backup_file_is_private_with_sidecar(client: Client, tmp_path: Path) -> None:
    result = client.backup(tmp_path)
    assert result.path.parent == tmp_path
    assert result.path.name.startswith("app-") and result.path.suffix == ".sqlite"
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    sidecar = result.path.with_name(result.path.name + ".manifest.json")
    assert result.sha256 in sidecar.read_text()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_open_connection_sees_restored_content(tmp_path: Path, wal: bool) -> None:
    db_path = make_sqlite_db(tmp_path / "live.sqlite", wal=wal)
    server = start_server(tmp_path, f"sqlite:///{db_path}", PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client:
            original = sqlite_content(db_path)
            backup = client.backup(tmp_path / "b.sqlite")
            held = sqlite3.connect(db_path)
            held.execute("UPDATE games SET title = 'stale' WHERE id = 1")
            held.commit()
            assert held.execute("SELECT title FROM games WHERE id = 1").fetchone() == ("stale",)

            client.restore(backup.path)

            # The connection that stayed open reads the restored content...
            assert held.execute("SELECT title FROM games WHERE id = 1").fetchone() != ("stale",)
            assert sqlite_content(db_path) == original
            # ...and closing it (which may checkpoint a WAL) does not undo the restore.
            held.close()
            assert sqlite_content(db_path) == original
            with sqlite3.connect(db_path) as db:
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == ("wal" if wal else "delete")
    finally:
        server.stop()


def test_restore_reports_phases_and_pre_restore_backup(
    client: Client, sqlite_db: Path, tmp_path: Path
) -> None:
    backup = client.backup(tmp_path / "b.sqlite")
    with sqlite3.connect(sqlite_db) as db:
        db.execute("CREATE TABLE before_restore (x)")
    content_before = sqlite_content(sqlite_db)
    phases: list[str] = []
    notices: list[tuple[str, str]] = []

    def on_progress(p: Progress) -> None:
        if not phases or phases[-1] != p.phase:
            phases.append(p.phase)

    result = client.restore(
        backup.path, on_progress=on_progress, on_notice=lambda r, m: notices.append((r, m))
    )

    assert phases == ["RECEIVING", "VERIFYING", "PRE_RESTORE_BACKUP", "RESTORING", "DONE"]
    pre = Path(result.pre_restore_backup_path)
    assert [r for r, m in notices if str(pre) in m] == ["PRE_RESTORE_BACKUP"]
    assert stat.S_IMODE(pre.stat().st_mode) == 0o600
    assert sqlite_content(pre) == content_before


def test_cancelled_backup_leaves_no_snapshot(sqlite_server: Server, sqlite_db: Path) -> None:
    with sqlite3.connect(sqlite_db) as db:  # big enough to need many chunks
        db.execute("CREATE TABLE filler (b BLOB)")
        db.executemany("INSERT INTO filler VALUES (randomblob(100000))", [()] * 200)
    from safehold.v1 import backup_service_pb2 as pb

    with sqlite_server.channel() as channel:
        from safehold.v1 import backup_service_pb2_grpc as pb_grpc

        call = pb_grpc.BackupServiceStub(channel).Backup(
            pb.BackupRequest(), metadata=sqlite_server.metadata()
        )
        stream = iter(call)
        assert next(stream).WhichOneof("frame") == "manifest"
        assert next(stream).WhichOneof("frame") == "chunk"
        call.cancel()  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 10
    while spool_leftovers(sqlite_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_leftovers(sqlite_server) == []


def test_sigterm_stops_cleanly(sqlite_server: Server) -> None:
    assert sqlite_server.stop() == 0
    assert "stopped" in sqlite_server.log()
    assert spool_leftovers(sqlite_server) == []


def test_leftover_spool_files_are_removed_at_start(tmp_path: Path, sqlite_db: Path) -> None:
    spool = tmp_path / "safehold-data" / "spool"
    spool.mkdir(parents=True)
    (spool / "safehold-spool-leftover").write_bytes(b"half an upload")
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        assert spool_leftovers(server) == []
        assert "safehold-spool-leftover" in server.log()
    finally:
        server.stop()


def test_missing_sqlite_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="no SQLite database at"):
        start_server(tmp_path, f"sqlite:///{tmp_path / 'typo.sqlite'}", PASSWORD)
    assert not (tmp_path / "typo.sqlite").exists()
