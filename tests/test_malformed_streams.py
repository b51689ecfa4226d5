"""Property-based: any sequence of restore frames gets a defined status with an
ErrorInfo reason, never UNKNOWN or INTERNAL, and the database is untouched; and
real backups with bytes changed inside well-formed frames (what a fuzzer that
knows the protocol would send) are restored, or refused with the truth."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from conftest import PgDatabase, make_sqlite_db
from helpers import Server, error_reason, frames, raw_restore, spool_leftovers, sqlite_content
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_postgres import fingerprint

from safehold.contract import Reason
from safehold.v1 import backup_service_pb2 as pb

DEFINED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

payloads = st.binary(max_size=3000) | st.sampled_from(
    [
        b"SQLite format 3\x00" + bytes(200),
        b"PGDMP\x01\x0e\x00" + bytes(100),
        b"--\n-- PostgreSQL database dump\n",
    ]
)
headers = st.builds(
    lambda engine, size: pb.RestoreRequest(
        header=pb.RestoreHeader(engine=engine, expected_size_bytes=size)
    ),
    st.sampled_from([pb.ENGINE_UNSPECIFIED, pb.ENGINE_SQLITE, pb.ENGINE_POSTGRESQL, 7]),
    st.integers(min_value=0, max_value=2**64 - 1),
)
chunks = payloads.map(lambda data: pb.RestoreRequest(chunk=data))
trailers = st.builds(
    lambda size, digest: pb.RestoreRequest(trailer=pb.Digest(size_bytes=size, sha256=digest)),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.binary(max_size=40),
)
empty = st.just(pb.RestoreRequest())
any_frame = st.one_of(headers, chunks, trailers, empty)


@st.composite
def honest_trailer_streams(draw: st.DrawFn) -> list[pb.RestoreRequest]:
    """A well-formed stream whose payload is not a valid backup."""
    data = draw(payloads)
    return [
        pb.RestoreRequest(header=pb.RestoreHeader()),
        pb.RestoreRequest(chunk=data),
        pb.RestoreRequest(
            trailer=pb.Digest(size_bytes=len(data), sha256=hashlib.sha256(data).digest())
        ),
    ]


streams = st.lists(any_frame, max_size=8) | honest_trailer_streams()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=streams)
def test_any_frame_sequence_gets_a_defined_status(
    requests: list[pb.RestoreRequest], sqlite_server: Server, sqlite_db: Path
) -> None:
    before = sqlite_content(sqlite_db)
    responses, err = raw_restore(sqlite_server, requests)
    assert err is not None, f"accepted a malformed stream: {responses}"
    code, reason, state = error_reason(err)
    assert code in DEFINED, (code, err)
    assert reason in {r.value for r in Reason} and reason != Reason.INTERNAL
    assert state == "UNCHANGED"
    assert sqlite_content(sqlite_db) == before
    assert spool_leftovers(sqlite_server) == []


@st.composite
def corrupted(draw: st.DrawFn, original: bytes) -> bytes:
    """A real backup with a few bytes changed, or cut short: well framed, broken inside."""
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        data[draw(st.integers(min_value=0, max_value=len(data) - 1))] = draw(
            st.integers(min_value=0, max_value=255)
        )
    if draw(st.booleans()):
        del data[draw(st.integers(min_value=len(data) // 2, max_value=len(data))) :]
    return bytes(data)


def assert_truthful(
    server: Server, data: bytes, content: Callable[[], Any], before: Any
) -> grpc.RpcError | None:
    """A defined outcome: restored, or refused/failed with the database as the state says."""
    responses, err = raw_restore(server, frames(data))
    if err is None:
        assert responses[-1].WhichOneof("frame") == "result"
        return None
    code, reason, state = error_reason(err)
    assert code in DEFINED | {grpc.StatusCode.ABORTED}, (code, err)
    assert reason != Reason.INTERNAL
    assert state in ("UNCHANGED", "RESTORED_FROM_PRE_RESTORE_BACKUP")
    assert content() == before
    return err


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_sqlite_files_in_valid_frames_get_a_truthful_outcome(
    data: st.DataObject, sqlite_server: Server, sqlite_db: Path, tmp_path_factory: Any
) -> None:
    original = make_sqlite_db(tmp_path_factory.mktemp("up") / "up.sqlite").read_bytes()
    upload = data.draw(corrupted(original))
    before = sqlite_content(sqlite_db)
    if assert_truthful(sqlite_server, upload, lambda: sqlite_content(sqlite_db), before) is None:
        copy = tmp_path_factory.mktemp("check") / "copy.sqlite"
        copy.write_bytes(upload)
        assert sqlite_content(sqlite_db) == sqlite_content(copy)


_ARCHIVES: dict[str, bytes] = {}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_pg_archives_in_valid_frames_get_a_truthful_outcome(
    data: st.DataObject, pg_server: Server, pg_db: PgDatabase, tmp_path_factory: Any
) -> None:
    if pg_db.name not in _ARCHIVES:  # once per database: hypothesis reuses the fixture
        pg_db.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);"
            "INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 500) i;"
        )
        dump = pg_db.cluster.dump(pg_db.name, tmp_path_factory.mktemp("pg") / "a.dump", "-Fc")
        _ARCHIVES[pg_db.name] = dump.read_bytes()
        pg_db.execute("CREATE TABLE only_before (x int)")
    upload = data.draw(corrupted(_ARCHIVES[pg_db.name]))
    before = fingerprint(pg_db)
    assert_truthful(pg_server, upload, lambda: fingerprint(pg_db), before)
