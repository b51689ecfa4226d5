"""The faster paths of issue 13 still make complete, restorable, consistent backups:
the default compression chosen by pg_dump version, the cheaper pre-restore backup,
and the SQLite snapshot. (How fast they are is bench/'s business, not a test's.)"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import Server, add_filler, sqlite_content, start_server
from pg import Cluster
from test_crashes import wait_until

from safehold.client import Client
from safehold.server.engines.postgres import compression
from safehold.server.engines.postgres.tools import Tools


def listed_compression(archive: Path) -> str:
    """What pg_restore says about an archive's compression ('1', 'gzip', 'zstd', ...)."""
    listing = subprocess.run(
        ["pg_restore", "--list", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in listing.splitlines() if line.startswith(";     Compression:"))
    return line.split(":", 1)[1].strip()


def shows(listed: str, setting: str) -> bool:
    """Whether pg_restore's word for an archive's compression is what --compress set:
    pg_dump 15 prints the gzip level, 16 and later the method."""
    method = {"0": "none"}.get(setting, "gzip" if setting.isdigit() else setting.partition(":")[0])
    return listed in (setting, method)


def test_default_compression_is_chosen_by_pg_dump_version() -> None:
    assert compression.choose("15.18", frozenset()) == compression.Compression("1", "0")
    assert compression.choose("15.18", frozenset({"lz4", "zstd"})) == compression.Compression(
        "1", "0"
    )
    assert compression.choose("16.4", frozenset({"lz4", "zstd"})) == compression.Compression(
        "zstd:1", "lz4"
    )
    assert compression.choose("17.2", frozenset()) == compression.Compression("1", "0")
    local = Tools()
    # PGDG's and Debian's pg_dump 16+ are built with both methods.
    assert compression.for_tools(local) == compression.choose(
        local.versions["pg_dump"], frozenset({"lz4", "zstd"})
    )


@pytest.mark.parametrize("level", [None, 0, 6])
def test_backup_compression_default_or_explicit_restores_completely(
    level: int | None, pg_client: Client, pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, body text);"
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 5000) g;"
    )
    backup = pg_client.backup(tmp_path / "items.dump", compression_level=level)
    expected = compression.for_tools(Tools()).default if level is None else str(level)
    assert shows(listed_compression(backup.path), expected)

    pg_db.execute("DELETE FROM items WHERE id > 10")
    pg_client.restore(backup.path)
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*), sum(id) FROM items").fetchone() == (5000, 12502500)


def test_pre_restore_backup_is_complete_and_restorable(
    pg_server: Server, pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    pg_db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, body text);"
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 5000) g;"
    )
    empty = pg_cluster.dump(pg_db.name, tmp_path / "schema.dump", "-Fc", "--schema-only")
    with Client(pg_server.target, pg_server.password) as client:
        result = client.restore(empty)
        pre_restore = Path(result.pre_restore_backup_path)
        assert shows(listed_compression(pre_restore), compression.for_tools(Tools()).pre_restore)
        with pg_db.connect() as db:
            assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)

        client.restore(pre_restore)
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*), sum(id) FROM items").fetchone() == (5000, 12502500)


@pytest.mark.parametrize("wal", [True, False], ids=["wal", "rollback-journal"])
def test_sqlite_snapshot_under_writes_and_checkpoints_is_one_restorable_point(
    wal: bool, tmp_path: Path
) -> None:
    """The snapshot copies the live file and its WAL as bytes while the
    application commits and checkpoints: the backup is one file, passes
    integrity_check, holds every transaction committed before the call and
    none half, and restores."""
    db = make_sqlite_db(tmp_path / "app.sqlite", wal=wal)
    add_filler(db, 8)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount INTEGER, pad BLOB)")
        conn.execute("CREATE TABLE totals (n INTEGER, sum INTEGER)")
        conn.execute("INSERT INTO totals VALUES (0, 0)")
    stop = threading.Event()
    committed = [0]

    def checkpointing(n: int) -> bool:
        """The writer checkpoints in turns of 300 commits, and not in between."""
        return (n // 300) % 2 == 0

    def keep_writing() -> None:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and committed[0] < 50_000:
                amount = committed[0] % 97
                with conn:
                    conn.execute(
                        "INSERT INTO ledger (amount, pad) VALUES (?, randomblob(3000))", (amount,)
                    )
                    conn.execute("UPDATE totals SET n = n + 1, sum = sum + ?", (amount,))
                committed[0] += 1
                if wal and checkpointing(committed[0]) and committed[0] % 20 == 0:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # rewrites the main file

    server = start_server(tmp_path, f"sqlite:///{db}", PASSWORD)
    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        # Start while the last transactions are in the WAL only, not yet in the file.
        assert wait_until(lambda: committed[0] >= 100 and not checkpointing(committed[0]))
        with Client(server.target, PASSWORD) as client:
            before = committed[0]
            backup = client.backup(tmp_path / "during-writes.sqlite")
            during = committed[0]
            assert during > before or committed[0] >= 50_000  # the writer was not held back
            stop.set()
            writer.join()
            with contextlib.closing(
                sqlite3.connect(f"{backup.path.as_uri()}?immutable=1", uri=True)
            ) as copy:  # immutable: the file alone, no WAL beside it
                assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                n, total = copy.execute("SELECT n, sum FROM totals").fetchone()
                assert copy.execute(
                    "SELECT count(*), coalesce(sum(amount), 0) FROM ledger"
                ).fetchone() == (n, total)
            assert before <= n <= committed[0]
            expected = sqlite_content(backup.path)
            client.restore(backup.path)
        assert sqlite_content(db) == expected
    finally:
        stop.set()
        writer.join()
        server.stop()
