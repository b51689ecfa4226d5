"""Many callers at once, and callers that vanish: limits hold, resources come back,
the database stays consistent and nothing is left on disk."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD
from helpers import (
    Server,
    add_filler,
    error_reason,
    frames,
    held_before_trailer,
    raw_restore,
    spool_leftovers,
    sqlite_content,
    start_server,
    wait_until_writing,
)

from safehold.client import Client
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc


def peak_rss_mib(server: Server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def open_fds_and_threads(server: Server) -> tuple[int, int]:
    proc = Path(f"/proc/{server.process.pid}")
    return len(list((proc / "fd").iterdir())), len(list((proc / "task").iterdir()))


def test_eight_backups_at_once(sqlite_server: Server, sqlite_db: Path, tmp_path: Path) -> None:
    add_filler(sqlite_db, 20)
    expected = sqlite_content(sqlite_db)

    def one(i: int) -> Path:
        with Client(sqlite_server.target, PASSWORD) as client:
            return client.backup(tmp_path / f"parallel-{i}.sqlite").path

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(one, range(8)))

    assert all(sqlite_content(p) == expected for p in paths)
    assert peak_rss_mib(sqlite_server) < 200
    assert spool_leftovers(sqlite_server) == []


def test_backups_over_the_limit_are_refused(tmp_path: Path, sqlite_db: Path) -> None:
    add_filler(sqlite_db, 20)
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--max-concurrent-backups", "2"
    )
    try:
        with server.channel() as channel:
            stub = pb_grpc.BackupServiceStub(channel)
            held = [stub.Backup(pb.BackupRequest(), metadata=server.metadata()) for _ in range(2)]
            for call in held:  # started, and stalled by flow control: the client reads no more
                assert next(iter(call)).WhichOneof("frame") == "manifest"
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Backup(pb.BackupRequest(), metadata=server.metadata()))
            assert error_reason(info.value) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_BACKUPS",
                "UNCHANGED",
            )
            for call in held:
                call.cancel()  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 10
        while "backup abandoned" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        with Client(server.target, PASSWORD) as client:
            client.backup(tmp_path / "after.sqlite")
    finally:
        server.stop()


def test_abandoned_backups_give_back_files_and_threads(
    sqlite_server: Server, sqlite_db: Path
) -> None:
    add_filler(sqlite_db, 20)

    def abandon_one() -> None:
        with sqlite_server.channel() as channel:
            call = pb_grpc.BackupServiceStub(channel).Backup(
                pb.BackupRequest(), metadata=sqlite_server.metadata()
            )
            stream = iter(call)
            next(stream)
            next(stream)
            call.cancel()  # type: ignore[no-untyped-call]

    def settled() -> tuple[int, int]:
        time.sleep(0.5)
        return open_fds_and_threads(sqlite_server)

    for _ in range(5):  # warm up: the worker pool grows to what this load needs, then stays
        abandon_one()
    before = settled()
    for _ in range(5):
        abandon_one()
    deadline = time.monotonic() + 10
    while settled() != before and time.monotonic() < deadline:
        pass
    assert settled() == before
    assert spool_leftovers(sqlite_server) == []
    assert sqlite_server.log().count("backup abandoned by the client") >= 10


def hold_in_phase(db: Path, phase: str) -> sqlite3.Connection:
    """A barrier on the live database that the server cannot pass: an exclusive
    lock stops the pre-restore snapshot (so a restore seen VERIFYING or in
    PRE_RESTORE_BACKUP stays before the replace), a read transaction stops the
    replace itself (so a restore seen RESTORING stays inside it). Closing the
    connection releases it."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    if phase in ("VERIFYING", "PRE_RESTORE_BACKUP"):
        conn.execute("BEGIN EXCLUSIVE")
    elif phase == "RESTORING":
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM games").fetchall()
    return conn


@pytest.mark.parametrize("phase", ["RECEIVING", "VERIFYING", "PRE_RESTORE_BACKUP", "RESTORING"])
@pytest.mark.parametrize("how", ["cancel", "deadline", "disconnect"])
def test_client_gone_during_restore(
    phase: str, how: str, sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    """The server is held in the phase (by the trailer held back, or by a lock
    on the database) until the client has gone; only then does it go on. Gone
    before the replace, nothing changes; gone during it, the replace completes."""
    add_filler(sqlite_db, 10)
    with Client(sqlite_server.target, PASSWORD) as client:
        backup = client.backup(tmp_path / "b.sqlite")
    with sqlite3.connect(sqlite_db) as conn:
        conn.execute("UPDATE games SET title = 'changed'")
    old, new = sqlite_content(sqlite_db), sqlite_content(backup.path)
    assert old != new
    release = threading.Event()
    requests = frames(backup.path.read_bytes())
    upload: Iterator[pb.RestoreRequest] = (
        held_before_trailer(requests, release) if phase == "RECEIVING" else iter(requests)
    )
    barrier = hold_in_phase(sqlite_db, phase)

    channel = sqlite_server.channel()
    call = pb_grpc.BackupServiceStub(channel).Restore(
        upload, metadata=sqlite_server.metadata(), timeout=2 if how == "deadline" else None
    )
    seen: list[str] = []
    try:
        for response in call:
            seen.append(pb.RestorePhase.Name(response.progress.phase))
            if response.progress.phase == getattr(pb, f"RESTORE_PHASE_{phase}"):
                if phase == "RESTORING":
                    wait_until_writing(sqlite_db, sqlite_server.process.pid)
                if how == "cancel":
                    call.cancel()  # type: ignore[no-untyped-call]
                elif how == "disconnect":
                    channel.close()
                # "deadline": read on; the held server sends nothing until it passes.
                if how != "deadline":
                    break
        else:
            raise AssertionError("the restore ended although the client had gone")
    except grpc.RpcError as ended:
        expected = grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline" else None
        assert expected is None or ended.code() == expected, ended
    finally:
        release.set()
        barrier.close()
        channel.close()
    assert f"RESTORE_PHASE_{phase}" in seen

    deadline = time.monotonic() + 30
    ends = ("restore abandoned", "went away", "restore finished", "Restore failed")
    while not any(end in sqlite_server.log() for end in ends):
        assert time.monotonic() < deadline, sqlite_server.log()
        time.sleep(0.05)
    while spool_leftovers(sqlite_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_leftovers(sqlite_server) == []
    if phase == "RESTORING":  # the replace was under way: it completes
        assert sqlite_content(sqlite_db) == new
    else:
        assert sqlite_content(sqlite_db) == old
        assert "restore finished" not in sqlite_server.log()
    # The server is free for the next restore.
    _, err = raw_restore(sqlite_server, frames(backup.path.read_bytes()))
    assert err is None
    assert sqlite_content(sqlite_db) == new
