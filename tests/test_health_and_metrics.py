"""Health that tells the truth and metrics an operator can alert on, watched from
outside as a load balancer and Prometheus would: real database, real server."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import Server, add_filler, frames, run_cli, start_server
from psycopg import sql

from safehold.client import Client
from safehold.client.errors import DatabaseUnavailable
from safehold.contract import SERVICE_NAME
from safehold.server.config import SqliteTarget
from safehold.server.engines.sqlite import SqliteEngine
from safehold.server.health_watch import DatabaseHealth
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(server: Server, service: str) -> int:
    with server.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


def _until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _set_password(pg_db: PgDatabase, password: str) -> None:
    with pg_db.cluster.connect() as db:
        db.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(pg_db.role), sql.Literal(password)
            )
        )


def test_backup_service_health_follows_the_database(pg_db: PgDatabase, tmp_path: Path) -> None:
    server = start_server(tmp_path, pg_db.url, PASSWORD, "--health-interval", "0.2")
    try:
        assert _status(server, SERVICE_NAME) == SERVING
        _set_password(pg_db, "not-what-safehold-has")
        _until(lambda: _status(server, SERVICE_NAME) == NOT_SERVING, "NOT_SERVING")
        assert _status(server, "") == SERVING  # the process is up: tell the two apart
        env = server.client_env()
        assert run_cli("health", env=env).returncode == 0
        database = run_cli("health", "--service", SERVICE_NAME, env=env)
        assert database.returncode == 1 and "NOT_SERVING" in database.stdout
        with Client(server.target, PASSWORD) as client, pytest.raises(DatabaseUnavailable):
            client.server_info()
        _set_password(pg_db, PASSWORD)
        _until(lambda: _status(server, SERVICE_NAME) == SERVING, "SERVING again")
        with Client(server.target, PASSWORD) as client:
            assert client.server_info().database_name == pg_db.name
    finally:
        server.stop()
    assert "NOT_SERVING" in server.log() and "answers again" in server.log()


def test_health_is_not_serving_while_a_restore_drains_after_sigterm(
    tmp_path: Path, sqlite_db: Path
) -> None:
    server = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD, "--lock-timeout", "30")
    backup = tmp_path / "b.sqlite"
    with Client(server.target, PASSWORD) as client:
        client.backup(backup)
    holder = sqlite3.connect(sqlite_db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the application's long write: the replace waits
    outcome: list[object] = []

    def restore() -> None:
        with Client(server.target, PASSWORD) as client:
            try:
                outcome.append(client.restore(backup))
            except Exception as exc:
                outcome.append(exc)

    worker = threading.Thread(target=restore)
    worker.start()
    try:
        _until(lambda: "restore phase RESTORING" in server.log(), "the replace to start")
        server.process.send_signal(signal.SIGTERM)
        _until(lambda: "stopping:" in server.log(), "the server to begin stopping")
        assert _status(server, "") == NOT_SERVING
        assert _status(server, SERVICE_NAME) == NOT_SERVING
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        worker.join(60)
    # The SIGTERM above ends it: a second one (as stop() sends) could land while
    # the interpreter exits, when Python has put back the default action.
    assert server.process.wait(40) == 0
    assert server.stop() == 0
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(\S+) (\S+)$", text, re.MULTILINE)
        if not name.startswith("#")
    }


def test_every_series_exists_before_the_first_operation(metered: tuple[Server, str]) -> None:
    _, url = metered
    series = _scrape(url)
    for operation in ("backup", "restore"):
        for name in (
            "safehold_operations_started_total",
            "safehold_operations_finished_total",
            "safehold_bytes_total",
            "safehold_operations_in_flight",
            "safehold_operation_duration_seconds_count",
        ):
            assert series[f'{name}{{operation="{operation}"}}'] == 0.0, name
        failed = f'safehold_operations_failed_total{{operation="{operation}",reason="INTERNAL"}}'
        assert series[failed] == 0.0
    assert series['safehold_refusals_total{reason="UNAUTHENTICATED"}'] == 0.0
    assert series["process_resident_memory_bytes"] > 0


def test_bytes_and_in_flight_during_a_backup_and_refusals_by_reason(
    metered: tuple[Server, str], sqlite_db: Path
) -> None:
    server, url = metered
    add_filler(sqlite_db, 20)
    with server.channel() as channel:
        stub = pb_grpc.BackupServiceStub(channel)
        call = stub.Backup(pb.BackupRequest(), metadata=server.metadata())
        responses = iter(call)
        received = 0
        for response in responses:  # read part of it, then look while it is held open
            received += len(response.chunk)
            if received > 4 * 1024 * 1024:
                break
        during = _scrape(url)
        assert during['safehold_operations_in_flight{operation="backup"}'] == 1.0
        assert during['safehold_bytes_total{operation="backup"}'] >= received
        call.cancel()  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError):
            list(stub.Restore(iter(frames(b"x")), metadata=server.metadata("wrong")))
    _until(
        lambda: _scrape(url)['safehold_operations_in_flight{operation="backup"}'] == 0.0,
        "the cancelled backup to end",
    )
    after = _scrape(url)
    assert after['safehold_refusals_total{reason="UNAUTHENTICATED"}'] == 1.0
    assert after['safehold_operations_finished_total{operation="backup"}'] == 0.0

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in lines)
    refusal = next(e for e in lines if e["message"].startswith("refused"))
    assert refusal["reason"] == "UNAUTHENTICATED" and "127.0.0.1" in refusal["peer"]


def test_one_bad_probe_does_not_flip_health(tmp_path: Path) -> None:
    """Two probes in a row must agree: a database file gone for one probe changes nothing."""
    live = make_sqlite_db(tmp_path / "app.sqlite")
    engine = SqliteEngine(SqliteTarget(live), tmp_path, 1)
    servicer = health.HealthServicer()
    servicer.set(SERVICE_NAME, SERVING)
    watch = DatabaseHealth(engine.check, servicer, interval=60)

    def status() -> int:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return int(servicer.Check(request, None).status)  # type: ignore[arg-type]

    away = live.rename(tmp_path / "away.sqlite")
    watch.probe_once()
    assert status() == SERVING
    away.rename(live)
    watch.probe_once()
    away = live.rename(tmp_path / "away.sqlite")
    watch.probe_once()
    assert status() == SERVING
    watch.probe_once()
    assert status() == NOT_SERVING
    away.rename(live)
    watch.probe_once()
    assert status() == NOT_SERVING
    watch.probe_once()
    assert status() == SERVING
