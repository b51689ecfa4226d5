"""Every row of DESIGN.md's status table that applies to SQLite, with the
database compared afterwards: a failed restore never changes a byte."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD
from helpers import (
    Server,
    altered_copy,
    error_reason,
    frames,
    held_before_trailer,
    raw_restore,
    spool_leftovers,
    sqlite_content,
    start_server,
)

from safehold.client import AuthenticationFailed, Client, EngineMismatch, InvalidBackup
from safehold.v1 import backup_service_pb2 as pb

PG_CUSTOM = b"PGDMP\x01\x0e\x00\x04\x08\x01\x01\x00\x00\x00" + os.urandom(4000)
PG_PLAIN = b"--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n"


def pg_tar() -> bytes:
    header = b"toc.dat".ljust(257, b"\x00") + b"ustar\x0000"
    return header.ljust(1024, b"\x00")


@pytest.fixture
def valid_backup(client: Client, tmp_path: Path) -> bytes:
    return client.backup(tmp_path / "valid.sqlite").path.read_bytes()


Case = Callable[[bytes], list[pb.RestoreRequest]]


def _wrong_digest(data: bytes) -> list[pb.RestoreRequest]:
    return frames(
        data, trailer=pb.Digest(size_bytes=len(data), sha256=hashlib.sha256(b"x").digest())
    )


def _wrong_size(data: bytes) -> list[pb.RestoreRequest]:
    return frames(
        data, trailer=pb.Digest(size_bytes=len(data) + 1, sha256=hashlib.sha256(data).digest())
    )


def _truncated_with_matching_trailer(data: bytes) -> list[pb.RestoreRequest]:
    return frames(data[: len(data) // 2 + 100])


CASES: dict[str, tuple[Case, grpc.StatusCode, str]] = {
    "pg_dump custom archive": (
        lambda _: frames(PG_CUSTOM),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENGINE_MISMATCH",
    ),
    "pg_dump tar archive": (
        lambda _: frames(pg_tar()),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENGINE_MISMATCH",
    ),
    "plain SQL dump": (
        lambda _: frames(PG_PLAIN),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENGINE_MISMATCH",
    ),
    "header says PostgreSQL": (
        lambda d: frames(d, engine=pb.ENGINE_POSTGRESQL),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENGINE_MISMATCH",
    ),
    "random bytes": (
        lambda _: frames(os.urandom(70_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_A_BACKUP",
    ),
    "empty upload": (lambda _: frames(b""), grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP"),
    "cut before trailer": (
        lambda d: frames(d, with_trailer=False),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TRUNCATED_UPLOAD",
    ),
    "truncated file, honest trailer": (
        _truncated_with_matching_trailer,
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_A_BACKUP",
    ),
    "wrong digest": (_wrong_digest, grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH"),
    "wrong size": (_wrong_size, grpc.StatusCode.DATA_LOSS, "SIZE_MISMATCH"),
    "chunk before header": (lambda d: frames(d)[1:], grpc.StatusCode.INVALID_ARGUMENT, "BAD_FRAME"),
    "two headers": (
        lambda d: frames(d)[:1] + frames(d),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_FRAME",
    ),
    "chunk after trailer": (
        lambda d: [*frames(d), pb.RestoreRequest(chunk=b"x")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_FRAME",
    ),
    "no frames at all": (lambda _: [], grpc.StatusCode.INVALID_ARGUMENT, "TRUNCATED_UPLOAD"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_upload_leaves_database_untouched(
    case: str, sqlite_server: Server, sqlite_db: Path, valid_backup: bytes
) -> None:
    make, code, reason = CASES[case]
    with sqlite3.connect(sqlite_db) as db:  # differs from valid_backup: a restore would show
        db.execute("CREATE TABLE marker (x)")
    before = sqlite_content(sqlite_db)

    _, err = raw_restore(sqlite_server, make(valid_backup))

    assert err is not None
    assert error_reason(err) == (code, reason, "UNCHANGED")
    assert sqlite_content(sqlite_db) == before
    assert spool_leftovers(sqlite_server) == []


@pytest.mark.parametrize(
    "password",
    [None, "", "wrong", "x" * 5000, PASSWORD[:1], PASSWORD[:-1], PASSWORD + "x", PASSWORD.upper()],
    ids=["missing", "empty", "wrong", "oversized", "first-char", "prefix", "extended", "upper"],
)
def test_bad_password_is_refused_for_every_call(
    password: str | None, sqlite_server: Server, sqlite_db: Path, valid_backup: bytes
) -> None:
    with sqlite3.connect(sqlite_db) as db:
        db.execute("CREATE TABLE marker (x)")
    before = sqlite_content(sqlite_db)
    metadata = () if password is None else sqlite_server.metadata(password)
    with sqlite_server.channel() as channel:
        from safehold.v1 import backup_service_pb2_grpc as pb_grpc

        stub = pb_grpc.BackupServiceStub(channel)
        calls: list[Callable[[], object]] = [
            lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata),
            lambda: list(stub.Backup(pb.BackupRequest(), metadata=metadata)),
            lambda: list(stub.Restore(iter(frames(valid_backup)), metadata=metadata)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert error_reason(info.value)[:2] == (
                grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED",
            )
    assert sqlite_content(sqlite_db) == before
    assert "restore started" not in sqlite_server.log()


def test_client_reports_wrong_password(sqlite_server: Server) -> None:
    with Client(sqlite_server.target, "wrong") as client, pytest.raises(AuthenticationFailed):
        client.server_info()


def test_client_refuses_other_engine_before_uploading(
    client: Client, sqlite_server: Server, tmp_path: Path
) -> None:
    dump = tmp_path / "app.dump"
    dump.write_bytes(PG_CUSTOM)
    with pytest.raises(EngineMismatch) as info:
        client.restore(dump)
    assert info.value.database_state == "UNCHANGED"
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(5000))
    with pytest.raises(InvalidBackup) as refused:
        client.restore(noise)
    assert "nothing was sent" in str(info.value) and "nothing was sent" in str(refused.value)
    # The server's own header and format checks would refuse these too, but
    # they log it: an empty log shows the client refused before calling Restore.
    log = sqlite_server.log()
    assert "Restore failed" not in log and "restore started" not in log


def test_second_restore_while_one_runs_is_aborted(
    sqlite_server: Server, sqlite_db: Path, valid_backup: bytes
) -> None:
    with sqlite3.connect(sqlite_db) as db:
        db.execute("CREATE TABLE marker (x)")
    before = sqlite_content(sqlite_db)
    release = threading.Event()
    first: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
    runner = threading.Thread(
        target=lambda: first.append(
            raw_restore(sqlite_server, held_before_trailer(frames(valid_backup), release))
        )
    )
    runner.start()
    try:
        _wait_for(lambda: "restore phase RECEIVING" in sqlite_server.log())
        responses, err = raw_restore(sqlite_server, frames(valid_backup))
        assert err is not None
        assert error_reason(err) == (grpc.StatusCode.ABORTED, "RESTORE_IN_PROGRESS", "UNCHANGED")
        assert sqlite_content(sqlite_db) == before
    finally:
        release.set()
        runner.join(30)
    ((responses, err),) = first
    assert err is None and responses[-1].WhichOneof("frame") == "result"
    assert sqlite_content(sqlite_db) != before  # the first restore went through


def test_upload_over_limit_is_refused(tmp_path: Path, sqlite_db: Path) -> None:
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--max-upload-bytes", "10000"
    )
    try:
        before = sqlite_content(sqlite_db)
        data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")
        assert len(data) > 10000
        # Without a declared size: refused as the upload crosses the limit.
        _, err = raw_restore(server, frames(data))
        assert err is not None
        assert error_reason(err) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPLOAD_TOO_LARGE",
            "UNCHANGED",
        )
        # With a declared size: refused at the header.
        requests = frames(data)
        requests[0].header.expected_size_bytes = len(data)
        _, err = raw_restore(server, requests)
        assert err is not None
        assert error_reason(err)[1] == "UPLOAD_TOO_LARGE"
        assert sqlite_content(sqlite_db) == before
        assert spool_leftovers(server) == []
    finally:
        server.stop()


def test_upload_limit_is_exact(tmp_path: Path, sqlite_db: Path) -> None:
    """An upload of exactly --max-upload-bytes is restored; one byte more is
    refused on the chunk that crosses the limit, before it is spooled."""
    data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--max-upload-bytes", str(len(data))
    )
    try:
        before = sqlite_content(sqlite_db)
        over = data + b"\0"
        crossing = frames(over, chunk=len(over) - 2)  # the second chunk crosses, by 1 byte
        _, err = raw_restore(server, crossing)
        assert err is not None
        assert error_reason(err) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "UPLOAD_TOO_LARGE",
            "UNCHANGED",
        )
        assert sqlite_content(sqlite_db) == before
        _, err = raw_restore(server, frames(data))
        assert err is None
        assert sqlite_content(sqlite_db) == sqlite_content(tmp_path / "upload.sqlite")
    finally:
        server.stop()


def test_password_of_the_longest_length_is_accepted(tmp_path: Path, sqlite_db: Path) -> None:
    """4096 bytes is the longest password compared; longer ones are refused unread."""
    longest = "p" * 4096
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", longest)
    try:
        with Client(server.target, longest) as client:
            assert client.server_info().engine == "SQLite"
        with Client(server.target, longest + "p") as client, pytest.raises(AuthenticationFailed):
            client.server_info()
    finally:
        server.stop()


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_during_upload_ends_it_clearly(tmp_path: Path, sqlite_db: Path) -> None:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--shutdown-grace", "20")
    before = sqlite_content(sqlite_db)
    data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")

    def slow_upload() -> Iterator[pb.RestoreRequest]:
        for i, frame in enumerate(frames(data, chunk=1024)):
            if i > 5:
                time.sleep(0.05)
            yield frame

    outcome: list[tuple[list[pb.RestoreResponse], grpc.RpcError | None]] = []
    uploader = threading.Thread(target=lambda: outcome.append(raw_restore(server, slow_upload())))
    uploader.start()
    _wait_for(lambda: "restore phase RECEIVING" in server.log())
    started = time.monotonic()
    assert server.stop() == 0
    uploader.join(30)
    ((_, err),) = outcome
    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "UNCHANGED")
    assert time.monotonic() - started < 15  # ended by the check, not by the grace period
    assert sqlite_content(sqlite_db) == before
    assert spool_leftovers(server) == []


def test_stalled_upload_is_ended_and_frees_the_server(tmp_path: Path, sqlite_db: Path) -> None:
    server = start_server(
        tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--upload-idle-timeout", "1"
    )
    try:
        with sqlite3.connect(sqlite_db) as db:
            db.execute("CREATE TABLE marker (x)")
        before = sqlite_content(sqlite_db)
        data = altered_copy(sqlite_db, tmp_path / "upload.sqlite")
        never = threading.Event()
        started = time.monotonic()
        _, err = raw_restore(server, held_before_trailer(frames(data), never))
        assert err is not None and err.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 10
        assert "no data from the client for 1s" in server.log()
        _wait_for(lambda: "the upload was abandoned" in server.log())  # cleanup has run
        assert sqlite_content(sqlite_db) == before
        assert spool_leftovers(server) == []
        _, err = raw_restore(server, frames(data))  # the restore lock is free again
        assert err is None
    finally:
        never.set()
        server.stop()
