"""The client's own checks, against a server that lies.

A real safehold server always sends a trailer that matches its chunks, so it
cannot show that the client checks the trailer before renaming a backup into
place. These tests run a hostile server in-process: real gRPC on loopback,
the real health service, and a BackupService that sends a manifest, real
bytes, and then a trailer that is wrong in one way each time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD
from fake_server import WithoutRepository
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from safehold.client import Client, IncompleteBackup
from safehold.contract import SERVICE_NAME
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

CONTENT = b"SQLite format 3\x00" + bytes(range(256)) * 64


def _trailer(data: bytes) -> pb.Digest:
    return pb.Digest(size_bytes=len(data), sha256=hashlib.sha256(data).digest())


LIES: dict[str, list[pb.BackupResponse]] = {
    "wrong-sha256": [
        pb.BackupResponse(chunk=CONTENT),
        pb.BackupResponse(trailer=_trailer(CONTENT[:-1] + b"!")),
    ],
    "wrong-size": [
        pb.BackupResponse(chunk=CONTENT),
        pb.BackupResponse(
            trailer=pb.Digest(size_bytes=len(CONTENT) + 1, sha256=_trailer(CONTENT).sha256)
        ),
    ],
    "a-chunk-lost": [
        pb.BackupResponse(chunk=CONTENT[:100]),
        pb.BackupResponse(trailer=_trailer(CONTENT)),
    ],
    "no-trailer": [pb.BackupResponse(chunk=CONTENT)],
    "second-manifest": [
        pb.BackupResponse(chunk=CONTENT),
        pb.BackupResponse(manifest=pb.BackupManifest(engine=pb.ENGINE_SQLITE)),
        pb.BackupResponse(trailer=_trailer(CONTENT)),
    ],
    "no-manifest": [],
}


class LyingService(WithoutRepository):
    """Sends a manifest (unless told not to), then the frames of one lie."""

    def __init__(self, lie: list[pb.BackupResponse], with_manifest: bool) -> None:
        self._lie = lie
        self._with_manifest = with_manifest

    def Backup(
        self, request: pb.BackupRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BackupResponse]:
        if self._with_manifest:
            yield pb.BackupResponse(
                manifest=pb.BackupManifest(
                    engine=pb.ENGINE_SQLITE,
                    dump_format=pb.DUMP_FORMAT_SQLITE_FILE,
                    database_name="app",
                    suggested_file_name="app.sqlite",
                )
            )
        yield from self._lie
        if not self._with_manifest:  # a whole backup, but for its missing manifest
            yield pb.BackupResponse(chunk=b"where the manifest should be")
            yield pb.BackupResponse(chunk=CONTENT)
            yield pb.BackupResponse(trailer=_trailer(CONTENT))

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "only backups lie here")

    def Restore(
        self, request_iterator: Iterator[pb.RestoreRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RestoreResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "only backups lie here")


def serve(service: pb_grpc.BackupServiceServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_BackupServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_backup_whose_trailer_does_not_match_is_never_renamed_into_place(
    lie: str, tmp_path: Path
) -> None:
    server, target = serve(LyingService(LIES[lie], with_manifest=lie != "no-manifest"))
    dest = tmp_path / "backups" / "app.sqlite"
    dest.parent.mkdir()
    dest.write_bytes(b"an older backup the user keeps")
    try:
        with Client(target, PASSWORD, attempts=1) as client, pytest.raises(IncompleteBackup):
            client.backup(dest, force=True)  # allowed to replace it, once verified
    finally:
        server.stop(None)
    # The older file under that name is intact, and no partial file is left beside it.
    assert dest.read_bytes() == b"an older backup the user keeps"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["app.sqlite"]


def test_an_honest_stream_is_saved(tmp_path: Path) -> None:
    """The same server telling the truth: the checks above refuse only the lies."""
    honest = [pb.BackupResponse(chunk=CONTENT), pb.BackupResponse(trailer=_trailer(CONTENT))]
    server, target = serve(LyingService(honest, with_manifest=True))
    try:
        with Client(target, PASSWORD, attempts=1) as client:
            result = client.backup(tmp_path)
    finally:
        server.stop(None)
    assert result.path == tmp_path / "app.sqlite"
    assert result.path.read_bytes() == CONTENT
    assert result.sha256 == hashlib.sha256(CONTENT).hexdigest()
