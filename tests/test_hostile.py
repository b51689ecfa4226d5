"""Exhaustion: a full spool disk, a long soak (guessing and floods: test_floods.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from helpers import (
    Server,
    error_reason,
    frames,
    raw_restore,
    spool_leftovers,
    sqlite_content,
    start_server,
)

from safehold.client import Client
from safehold.v1 import backup_service_pb2 as pb


def server_rss_and_fds(server: Server) -> tuple[float, int]:
    proc = Path(f"/proc/{server.process.pid}")
    rss = next(
        int(line.split()[1])
        for line in (proc / "status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss / 1024, len(list((proc / "fd").iterdir()))


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system for the spool directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    spool = tmp_path / "tiny-spool"
    spool.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(spool)], check=True
    )
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=True)


def test_spool_out_of_space_is_reported_and_changes_nothing(
    tmp_path: Path, tiny_spool: Path
) -> None:
    db = make_sqlite_db(tmp_path / "live.sqlite")
    big = make_sqlite_db(tmp_path / "big.sqlite")
    with sqlite3.connect(big) as conn:
        conn.execute("CREATE TABLE filler (b BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(100000))", [()] * 40)
    server = start_server(tmp_path, f"sqlite:///{db}", PASSWORD, "--spool-dir", str(tiny_spool))
    try:
        before = sqlite_content(db)
        _, err = raw_restore(server, frames(big.read_bytes()))
        assert err is not None
        code, reason, state = error_reason(err)
        assert (code, reason, state) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SPOOL_FAILED",
            "UNCHANGED",
        )
        assert "out of space" in (err.details() or "")
        assert sqlite_content(db) == before
        assert list(tiny_spool.iterdir()) == []
    finally:
        server.stop()


def soak(
    server: Server,
    tmp_path: Path,
    change: Callable[[], None],
    read: Callable[[], object],
    cycles: int = 50,
) -> None:
    """Alternate two contents through backup and restore, checking each cycle,
    and check the server's memory and open files stay flat."""
    with Client(server.target, PASSWORD) as client:
        a = client.backup(tmp_path / "a")
        expected_a = read()
        change()
        b = client.backup(tmp_path / "b")
        expected_b = read()
        deadline = time.monotonic() + 300
        levels = []
        for cycle in range(cycles):
            assert time.monotonic() < deadline
            source, expected = (a, expected_a) if cycle % 2 == 0 else (b, expected_b)
            client.restore(source.path)
            assert read() == expected
            again = client.backup(tmp_path / f"cycle-{cycle % 2}", force=True)
            assert again.size_bytes > 0
            if cycle in (4, cycles - 1):
                time.sleep(0.3)
                levels.append(server_rss_and_fds(server))
    (rss_first, fds_first), (rss_last, fds_last) = levels
    assert rss_last - rss_first < 15, levels
    assert fds_last == fds_first, levels


def test_soak_sqlite(sqlite_server: Server, sqlite_db: Path, tmp_path: Path) -> None:
    def change() -> None:
        with sqlite3.connect(sqlite_db) as conn:
            conn.execute("UPDATE games SET title = 'b ' || title")
            conn.execute("CREATE TABLE only_in_b (x)")

    soak(sqlite_server, tmp_path, change, lambda: sqlite_content(sqlite_db))


def test_soak_postgres(pg_server: Server, pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(
        "CREATE TABLE t (x int, y text); INSERT INTO t SELECT i, md5(i::text) "
        "FROM generate_series(1, 2000) i;"
    )

    def read() -> object:
        with pg_db.connect() as conn:
            return conn.execute(
                "SELECT count(*), sum(x), to_regclass('public.only_in_b') IS NULL FROM t"
            ).fetchone()

    soak(
        pg_server,
        tmp_path,
        lambda: pg_db.execute("DELETE FROM t WHERE x % 2 = 0; CREATE TABLE only_in_b (x int)"),
        read,
        cycles=50,
    )


def test_chunk_over_the_message_limit_is_refused_by_the_transport(
    sqlite_server: Server, sqlite_db: Path
) -> None:
    """gRPC refuses a message over 4 MiB before safehold sees it (so without an
    ErrorInfo); nothing is spooled and the database is untouched."""
    before = sqlite_content(sqlite_db)
    _, err = raw_restore(
        sqlite_server,
        [
            pb.RestoreRequest(header=pb.RestoreHeader()),
            pb.RestoreRequest(chunk=b"x" * (5 * 1024 * 1024)),
        ],
    )
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sqlite_content(sqlite_db) == before
    assert spool_leftovers(sqlite_server) == []
