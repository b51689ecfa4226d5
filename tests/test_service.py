"""Health checking and reflection work without a password; the contract is discoverable."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import Server

from safehold.client import Client


def test_health_needs_no_password(sqlite_server: Server) -> None:
    with sqlite_server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "safehold.v1.BackupService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(sqlite_server: Server) -> None:
    with sqlite_server.channel() as channel:
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


def test_reflection_serves_the_contract(sqlite_server: Server) -> None:
    """What grpcurl does: fetch the service's file descriptor by symbol."""
    from google.protobuf import descriptor_pb2

    with sqlite_server.channel() as channel:
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
    assert services["BackupService"] == ["Backup", "Restore", "GetServerInfo"]
