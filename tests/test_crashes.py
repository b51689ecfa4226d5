"""The server killed (SIGKILL) in every phase of a restore: after a restart the
database holds the old or the new content, never a mix; the pre-restore backup
is intact; leftovers are cleaned at start-up and logged; no child survives."""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import (
    Server,
    frames,
    held_before_trailer,
    holds_write_lock,
    raw_restore,
    spool_leftovers,
    sqlite_content,
    start_server,
)
from pg import Cluster

from safehold.v1 import backup_service_pb2 as pb

PHASES = ["RECEIVING", "VERIFYING", "PRE_RESTORE_BACKUP", "RESTORING"]


Barrier = Callable[[], object]
"""Takes hold of the database so that the server cannot pass the phase; its
return value, closed after the kill, lets go."""


def kill_during(
    server: Server, phase: str, data: bytes, hold: Barrier, inside: Callable[[], bool]
) -> list[Path]:
    """Restore data with the server held in `phase` (the trailer held back in
    RECEIVING; otherwise by `hold`), SIGKILL it once `inside()` says it is there,
    and check that it was killed in that phase. Returns the partial pre-restore
    files that existed at the kill."""
    release = threading.Event()
    requests = frames(data, chunk=256 * 1024)
    upload = held_before_trailer(requests, release) if phase == "RECEIVING" else iter(requests)
    barrier = hold() if phase != "RECEIVING" else None
    start = len(server.log())  # phases of this restore only
    outcome: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
    uploader = threading.Thread(target=lambda: outcome.append(raw_restore(server, upload)))
    uploader.start()
    try:
        deadline = time.monotonic() + 60
        while not (f"restore phase {phase}" in server.log()[start:] and inside()):
            assert time.monotonic() < deadline, f"never held in {phase}: {server.log()}"
            time.sleep(0.02)
        partials = pre_restore_partials(server)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    finally:
        release.set()
        if barrier is not None:
            barrier.close()  # type: ignore[attr-defined]
    uploader.join(60)
    assert not uploader.is_alive()
    # VERIFYING cannot be held itself: the hold stops the server at the start
    # of the pre-restore backup at the latest, before it reads or writes anything.
    reached = re.findall(r"restore phase (\w+)", server.log()[start:])[-1]
    assert reached == phase or (phase == "VERIFYING" and reached == "PRE_RESTORE_BACKUP")
    return partials


def pre_restore_partials(server: Server) -> list[Path]:
    return sorted(server.data_dir.rglob(".pre-restore*.partial-*"))


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
    assert pre_restore_partials(again) == []
    return again


def sqlite_hold(db: Path, phase: str) -> Barrier:
    """An exclusive lock stops the pre-restore snapshot; a read transaction
    stops the replace, which then waits holding its write lock."""

    def hold() -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        if phase == "RESTORING":
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM games").fetchall()
        else:
            conn.execute("BEGIN EXCLUSIVE")
        return conn

    return hold


@pytest.mark.parametrize("phase", PHASES)
def test_sqlite_killed_in_each_phase(phase: str, tmp_path: Path) -> None:
    db = make_sqlite_db(tmp_path / "live.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (b BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(50000))", [()] * 100)
    new_file = tmp_path / "new.sqlite"
    shutil.copy(db, new_file)
    with sqlite3.connect(new_file) as conn:
        conn.execute("UPDATE games SET title = 'new ' || title")
        conn.execute("DELETE FROM filler WHERE rowid % 2 = 0")
    url = f"sqlite:///{db}"
    server = start_server(tmp_path, url, PASSWORD, "--lock-timeout", "60")
    # A first restore, so that a previous pre-restore backup exists to be kept.
    responses, err = raw_restore(server, frames(db.read_bytes()))
    assert err is None
    previous = Path(responses[-1].result.pre_restore_backup_path)
    previous_content = sqlite_content(previous)
    old = sqlite_content(db)
    assert old != sqlite_content(new_file)

    inside = {
        "RECEIVING": lambda: bool(spool_leftovers(server)),
        "VERIFYING": lambda: True,
        "PRE_RESTORE_BACKUP": lambda: bool(pre_restore_partials(server)),
        "RESTORING": lambda: holds_write_lock(db, server.process.pid),
    }[phase]
    partials = kill_during(server, phase, new_file.read_bytes(), sqlite_hold(db, phase), inside)

    again = restart(server, tmp_path, url)
    try:
        assert sqlite_content(db) == old  # held before its write, the replace never wrote
        assert sqlite_content(previous) == previous_content
        if phase == "RECEIVING":
            assert "removed a leftover" in again.log()
        if phase == "PRE_RESTORE_BACKUP":
            assert partials and not any(p.exists() for p in partials)
            assert "removed a partial pre-restore backup" in again.log()
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


def pg_hold(db: PgDatabase, phase: str) -> Barrier:
    """An exclusive table lock stops the pre-restore pg_dump; a read lock stops
    the replace's DROP SCHEMA, which then waits inside its transaction."""

    def hold() -> Any:
        conn = db.connect()
        conn.autocommit = False
        mode = "ACCESS SHARE" if phase == "RESTORING" else "ACCESS EXCLUSIVE"
        conn.execute(f"LOCK TABLE items IN {mode} MODE")
        return conn

    return hold


def waiting_for_a_lock(db: PgDatabase, what: str) -> bool:
    """Whether a session of safehold's child `what` waits for a lock on db."""
    with db.cluster.connect(db.name) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
            " AND application_name = 'safehold' AND query ILIKE %s",
            (db.name, f"%{what}%"),
        ).fetchone()
    return row is not None and row[0] > 0


@pytest.mark.parametrize("phase", PHASES)
def test_postgres_killed_in_each_phase(
    phase: str, big_pg_db: PgDatabase, pg_cluster: Cluster, tmp_path: Path
) -> None:
    archive = tmp_path / "new.dump"
    pg_cluster.dump(big_pg_db.name, archive, "-Fc", "-Z0")
    new = pg_state(big_pg_db)
    big_pg_db.execute("DELETE FROM items WHERE id % 3 = 0; CREATE TABLE marker (x int);")
    old = pg_state(big_pg_db)
    assert old != new
    server = start_server(tmp_path, big_pg_db.url, PASSWORD, "--lock-timeout", "60")
    inside = {
        "RECEIVING": lambda: bool(spool_leftovers(server)),
        "VERIFYING": lambda: True,
        "PRE_RESTORE_BACKUP": lambda: waiting_for_a_lock(big_pg_db, "LOCK TABLE"),
        "RESTORING": lambda: waiting_for_a_lock(big_pg_db, "DROP SCHEMA"),
    }[phase]

    partials = kill_during(server, phase, archive.read_bytes(), pg_hold(big_pg_db, phase), inside)

    port = pg_cluster.port
    assert wait_until(lambda: not safehold_children(tmp_path, port)), safehold_children(
        tmp_path, port
    )
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
        assert pg_state(big_pg_db) == old  # killed before or inside its transaction
        if phase == "PRE_RESTORE_BACKUP":
            assert partials and not any(p.exists() for p in partials)
            assert "removed a partial pre-restore backup" in again.log()
    finally:
        again.stop()
