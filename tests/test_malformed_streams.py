"""Property-based: any sequence of restore frames gets a defined status with an
ErrorInfo reason, never UNKNOWN or INTERNAL, and the database is untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
from helpers import Server, error_reason, raw_restore, spool_leftovers, sqlite_content
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
