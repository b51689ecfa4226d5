"""The server killed (SIGKILL) in every phase of a restore: after a restart the
database holds the old or the new content, never a mix; the pre-restore backup
is intact; leftovers are cleaned at start-up and logged; no child survives."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import Server, frames, raw_restore, spool_leftovers, sqlite_content, start_server
from pg import Cluster

from safehold.v1 import backup_service_pb2 as pb

PHASES = ["RECEIVING", "VERIFYING", "PRE_RESTORE_BACKUP", "RESTORING"]


def kill_during(server: Server, phase: str, data: bytes) -> None:
    """Start a restore of data and SIGKILL the server once it logs `phase`."""

    def upload() -> Iterator[pb.RestoreRequest]:
        for i, frame in enumerate(frames(data, chunk=256 * 1024)):
            if phase == "RECEIVING" and i > 2:
                time.sleep(0.2)  # stay in RECEIVING until the kill
            yield frame

    outcome: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
    uploader = threading.Thread(target=lambda: outcome.append(raw_restore(server, upload())))
    uploader.start()
    deadline = time.monotonic() + 60
    while f"restore phase {phase}" not in server.log():
        assert time.monotonic() < deadline, f"never reached {phase}: {server.log()}"
        assert uploader.is_alive() or phase in server.log(), server.log()
        time.sleep(0.005)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    uploader.join(60)
    assert not uploader.is_alive()


def safehold_children(tmp_path: Path, port: int) -> list[str]:
    """psql, pg_dump or pg_restore processes started by this test's server: those that
    connect to its cluster, or read a file under its directory (other tests may run
    side by side on the same machine)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = f"PGPORT={port}".encode() in environ or any(
            str(tmp_path).encode() in arg for arg in argv
        )
        if ours and Path(argv[0].decode()).name in ("psql", "pg_dump", "pg_restore"):
            found.append(argv[0].decode())
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def restart(server: Server, tmp_path: Path, url: str, *args: str) -> Server:
    assert server.stop() == -signal.SIGKILL  # also checks its log for the password
    again = start_server(tmp_path, url, PASSWORD, *args)
    assert spool_leftovers(again) == []
    assert list(again.data_dir.glob("pre-restore/.pre-restore*.partial-*")) == []
    return again


@pytest.mark.parametrize("phase", PHASES)
def test_sqlite_killed_in_each_phase(phase: str, tmp_path: Path) -> None:
    db = make_sqlite_db(tmp_path / "live.sqlite")
    with sqlite3.connect(db) as conn:  # large enough for every phase to take a moment
        conn.execute("CREATE TABLE filler (b BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(50000))", [()] * 600)
    old = sqlite_content(db)
    new_file = tmp_path / "new.sqlite"
    shutil.copy(db, new_file)
    with sqlite3.connect(new_file) as conn:
        conn.execute("UPDATE games SET title = 'new ' || title")
        conn.execute("DELETE FROM filler WHERE rowid % 2 = 0")
    new = sqlite_content(new_file)
    url = f"sqlite:///{db}"
    server = start_server(tmp_path, url, PASSWORD)

    kill_during(server, phase, new_file.read_bytes())

    again = restart(server, tmp_path, url)
    try:
        assert sqlite_content(db) in (old, new)
        for pre in (again.data_dir / "pre-restore").glob("pre-restore-*.sqlite"):
            assert sqlite_content(pre) == old
        if phase == "RECEIVING":
            assert "removed a leftover" in again.log()
    finally:
        again.stop()


@pytest.fixture
def big_pg_db(pg_db: PgDatabase) -> PgDatabase:
    pg_db.execute("""
        CREATE TABLE items (id int PRIMARY KEY, body text);
        INSERT INTO items SELECT i, repeat(md5(i::text), 20) FROM generate_series(1, 150000) i;
        CREATE INDEX items_body ON items (body);
    """)
    return pg_db


def pg_state(db: PgDatabase) -> Any:
    with db.connect() as conn:
        return conn.execute(
            "SELECT count(*), sum(length(body)), to_regclass('public.marker') IS NOT NULL "
            "FROM items"
        ).fetchone()


@pytest.mark.parametrize("phase", PHASES)
def test_postgres_killed_in_each_phase(
    phase: str, big_pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    archive = tmp_path / "new.dump"
    pg_cluster.dump(big_pg_db.name, archive, "-Fc", "-Z0")
    new = pg_state(big_pg_db)
    big_pg_db.execute("DELETE FROM items WHERE id % 3 = 0; CREATE TABLE marker (x int);")
    old = pg_state(big_pg_db)
    server = start_server(tmp_path, big_pg_db.url, PASSWORD)

    kill_during(server, phase, archive.read_bytes())

    port = pg_cluster.port
    assert wait_until(lambda: not safehold_children(tmp_path, port)), safehold_children(
        tmp_path, port
    )
    assert wait_until(lambda: pg_state(big_pg_db) in (old, new))
    again = restart(server, tmp_path, big_pg_db.url)
    try:
        with big_pg_db.connect() as conn:  # the killed session is gone and holds no locks
            assert wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'safehold'"
                    ).fetchone()
                    == (0,)
                )
            )
        assert pg_state(big_pg_db) in (old, new)
        for pre in (again.data_dir / "pre-restore").glob("pre-restore-*.dump"):
            listing = subprocess.run(
                ["pg_restore", "--list", str(pre)], capture_output=True, check=False
            )
            assert listing.returncode == 0, listing.stderr
    finally:
        again.stop()
