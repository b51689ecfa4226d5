"""safehold next to a GameVault server: its DB_* environment, and its own backups
(a pg_dump tar archive, or a copy of the SQLite file) restore through safehold."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import sqlite_content, start_server
from pg import Cluster

from safehold.client import Client


def test_sqlite_from_gamevault_environment(tmp_path: Path) -> None:
    volume = tmp_path / "gamevault-db"
    volume.mkdir()
    live = make_sqlite_db(volume / "database.sqlite")
    gamevault_backup = tmp_path / "gamevault-backup.db"
    shutil.copy(live, gamevault_backup)  # what GameVault's SQLite backup is: a file copy
    original = sqlite_content(live)
    with sqlite3.connect(live) as db:
        db.execute("DELETE FROM games")

    server = start_server(
        tmp_path, "", PASSWORD, env={"DB_SYSTEM": "SQLITE", "VOLUMES_SQLITEDB": str(volume)}
    )
    try:
        with Client(server.target, PASSWORD) as client:
            assert client.server_info().database_name == "database"
            client.restore(gamevault_backup)
    finally:
        server.stop()
    assert sqlite_content(live) == original


def test_postgres_from_gamevault_environment(
    pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    pg_db.execute(
        "CREATE TABLE games (id int PRIMARY KEY, title text); "
        "INSERT INTO games VALUES (1, 'Celeste'), (2, 'Hades');"
    )
    # GameVault's /api/admin/database/backup runs pg_dump -F t.
    tar = pg_cluster.dump(
        pg_db.name,
        tmp_path / "gamevault-backup.tar",
        "-F",
        "t",
        env={**pg_cluster.env(), "PGUSER": pg_db.role, "PGPASSWORD": PASSWORD},
    )
    pg_db.execute("DROP TABLE games; CREATE TABLE leftover (x int);")
    gamevault_env = {
        "SAFEHOLD_PASSWORD": "",
        "DB_SYSTEM": "POSTGRESQL",
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(pg_cluster.port),
        "DB_USERNAME": pg_db.role,
        "DB_PASSWORD": PASSWORD,
        "DB_DATABASE": pg_db.name,
    }
    server = start_server(tmp_path, "", PASSWORD, env=gamevault_env)
    try:
        with Client(server.target, PASSWORD) as client:
            client.restore(tar)
    finally:
        server.stop()
    with pg_db.connect() as db:
        assert db.execute("SELECT title FROM games ORDER BY id").fetchall() == [
            ("Celeste",),
            ("Hades",),
        ]
        assert db.execute("SELECT to_regclass('public.leftover')").fetchone() == (None,)
