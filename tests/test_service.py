"""Health checking works without a password; with --reflection the contract is
discoverable, and without it reflection is not served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import Server, start_server

from safehold.client import Client


@pytest.fixture
def reflecting_server(tmp_path: Path, sqlite_db: Path) -> Iterator[Server]:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--reflection")
    yield server
    server.stop()


def test_health_needs_no_password(sqlite_server: Server) -> None:
    with sqlite_server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "safehold.v1.BackupService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_off_by_default(sqlite_server: Server) -> None:
    with sqlite_server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_service(reflecting_server: Server) -> None:
    with reflecting_server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
    assert "safehold.v1.BackupService" in names


def test_server_info(client: Client) -> None:
    info = client.server_info()
    assert info.engine == "SQLite"
    assert info.database_name == "app"
    assert info.database_size_bytes > 0
    assert info.tool_versions["sqlite"] == info.engine_version


def test_reflection_serves_the_contract(reflecting_server: Server) -> None:
    """What grpcurl does: fetch the service's file descriptor by symbol."""
    from google.protobuf import descriptor_pb2

    with reflecting_server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="safehold.v1.BackupService"
        )
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    services = {s.name: [m.name for m in s.method] for f in files for s in f.service}
    assert services["BackupService"][:3] == ["Backup", "Restore", "GetServerInfo"]
    assert {"ListRepositoryBackups", "CreateRepositoryBackup"} <= set(services["BackupService"])
