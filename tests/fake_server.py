"""A fake safehold server on loopback whose backup streams go wrong on purpose.

The real server never sends a wrong trailer or breaks off mid-stream on its own; this
one does, so that tests can show what the client leaves behind when that happens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from safehold.contract import SERVICE_NAME
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

CHUNK = 1024 * 1024


@dataclass
class Script:
    """What the fake backup sends: `data` in chunks, then a trailer (right or wrong),
    or it breaks off with UNAVAILABLE after the data when `break_off` is set."""

    data: bytes
    wrong_trailer: bool = False
    break_off: bool = False
    engine: pb.Engine.ValueType = pb.ENGINE_SQLITE


class WithoutRepository(pb_grpc.BackupServiceServicer):
    """A fake BackupService's answer to the repository RPCs: it has none."""

    def ListRepositoryBackups(
        self, request: pb.ListRepositoryBackupsRequest, context: grpc.ServicerContext
    ) -> pb.ListRepositoryBackupsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake server has no repository")

    def CreateRepositoryBackup(
        self, request: pb.CreateRepositoryBackupRequest, context: grpc.ServicerContext
    ) -> pb.CreateRepositoryBackupResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake server has no repository")


class _Servicer(WithoutRepository):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.restores = 0

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            engine=self.script.engine, engine_version="fake", database_name="fake"
        )

    def Backup(
        self, request: pb.BackupRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BackupResponse]:
        created = timestamp_pb2.Timestamp()
        created.GetCurrentTime()
        yield pb.BackupResponse(
            manifest=pb.BackupManifest(
                engine=self.script.engine,
                engine_version="fake",
                dump_format=pb.DUMP_FORMAT_SQLITE_FILE,
                database_name="fake",
                created_at=created,
                suggested_file_name="fake-backup.sqlite",
            )
        )
        data = self.script.data
        for i in range(0, len(data), CHUNK):
            yield pb.BackupResponse(chunk=data[i : i + CHUNK])
        if self.script.break_off:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the fake server breaks off")
        digest = hashlib.sha256(data).digest()
        if self.script.wrong_trailer:
            digest = hashlib.sha256(data + b"x").digest()
        yield pb.BackupResponse(trailer=pb.Digest(size_bytes=len(data), sha256=digest))

    def Restore(
        self, request_iterator: Iterator[pb.RestoreRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RestoreResponse]:
        self.restores += 1
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the fake server restores nothing")
        yield pb.RestoreResponse()


@dataclass
class FakeServer:
    target: str
    servicer: _Servicer


@contextmanager
def fake_server(script: Script) -> Iterator[FakeServer]:
    server = grpc.server(ThreadPoolExecutor(4))
    servicer = _Servicer(script)
    pb_grpc.add_BackupServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer)
    finally:
        server.stop(None)
