"""`safehold serve`: build the gRPC server, run it, stop it gracefully.

SIGTERM and Ctrl-C stop accepting calls, mark health NOT_SERVING, give
running calls a grace period and then cancel them; every call cleans up its
own temp files and child processes on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sqlite3
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from safehold import tlsfiles
from safehold.contract import SERVICE_NAME
from safehold.server import config as config_module
from safehold.server import logs
from safehold.server.auth import PasswordInterceptor
from safehold.server.capacity import CapacityInterceptor, groups, workers
from safehold.server.config import Config, SqliteTarget
from safehold.server.engines import open_engine
from safehold.server.errors import SafeholdError
from safehold.server.health_watch import DatabaseHealth
from safehold.server.keeper import Keeper
from safehold.server.metrics import Metrics
from safehold.server.servicer import BackupServicer
from safehold.server.spool import check_writable, remove_leftovers
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TRANSPORT_OPTIONS = [
    # Ping idle peers so that a vanished client's call is cancelled, and let
    # clients ping us every 10s or more while a long restore sends no data;
    # a peer that pings faster is sent GOAWAY after two strikes.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    # One connection cannot open more streams than a client needs; a
    # connection with no call for 5 minutes is closed; every connection is
    # asked to reconnect after an hour (calls under way finish first).
    ("grpc.max_concurrent_streams", 16),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_connection_age_ms", 3_600_000),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `safehold serve`."""
    config_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; the exit code for the CLI."""
    logs.configure(json_lines=bool(args.log_json))
    try:
        config = config_module.load(args)
        logs.configure(json_lines=config.log_json)
        _prepare(config)
        server, servicer, database_health, port = build(config)
        for path in servicer.pre_restore.remove_partials():
            log.info("removed a partial pre-restore backup from an earlier run: %s", path)
    except (config_module.ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    if servicer.keeper:
        servicer.keeper.start()
    if config.tls is None and _all_interfaces(config.listen):
        log.warning(
            "listening on all interfaces without TLS: passwords and backups cross the "
            "network in clear text; set --tls-cert and --tls-key"
        )
    database_health.start()
    log.info(
        "safehold listening on %s (port %d), database %s",
        config.listen,
        port,
        config.target.describe(),
    )
    stop.wait()
    grace = config.shutdown_grace_seconds
    log.info("stopping: refusing new calls, %gs grace for running ones", grace)
    # Health answers NOT_SERVING while running calls drain, rather than the
    # connection being refused: a load balancer sees the server leaving.
    database_health.enter_graceful_shutdown()
    servicer.begin_shutdown()
    started = time.monotonic()
    if servicer.keeper:
        servicer.keeper.stop(grace)
    servicer.wait_idle(max(0.0, grace - (time.monotonic() - started)))
    server.stop(max(0.0, grace - (time.monotonic() - started))).wait()
    log.info("stopped")
    return 0


def build(config: Config) -> tuple[grpc.Server, BackupServicer, DatabaseHealth, int]:
    """A bound, not yet started server with the service, health and reflection,
    and the probe that keeps BackupService's health true to its database."""
    engine = open_engine(config)
    with contextlib.suppress(SafeholdError):  # a database not up yet is no reason to stop
        for warning in engine.info().warnings:
            log.warning("%s", warning)
    metrics = Metrics()
    call_groups = groups(SERVICE_NAME)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers(call_groups), thread_name_prefix="safehold"),
        # The password is checked first, so refused calls never take a place.
        interceptors=[
            PasswordInterceptor(config.password, metrics, require_tls=config.tls is not None),
            CapacityInterceptor(call_groups, config.stall_timeout_seconds),
        ],
        maximum_concurrent_rpcs=workers(call_groups),
        options=TRANSPORT_OPTIONS,
    )
    if config.metrics_listen:
        metrics_port = metrics.serve(config.metrics_listen)
        log.info("metrics on %s (port %d)", config.metrics_listen, metrics_port)
    servicer = BackupServicer(engine, config, metrics)
    if config.repository:
        servicer.keeper = Keeper(config.repository, servicer, metrics.registry)
    pb_grpc.add_BackupServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["BackupService"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
    port = _bind(server, config)
    probe = DatabaseHealth(engine.check, health_servicer, config.health_interval_seconds)
    return server, servicer, probe, port


def _bind(server: grpc.Server, config: Config) -> int:
    credentials = None
    if config.tls:
        try:
            tlsfiles.check_pair(config.tls.cert, config.tls.key, "server")
            tlsfiles.check_ca(config.tls.client_ca, "client CA")
        except tlsfiles.TlsFileError as exc:
            raise config_module.ConfigError(str(exc)) from None
        client_ca = config.tls.client_ca.read_bytes() if config.tls.client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(config.tls.key.read_bytes(), config.tls.cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
    port = _add_port(server, config.listen, credentials)
    if config.health_listen:
        # Plaintext on loopback for a container's HEALTHCHECK; BackupService
        # refuses calls that do not come over TLS when TLS is configured.
        _add_port(server, config.health_listen, None)
    return port


def _add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(f"cannot listen on {address}")
    return port


def _all_interfaces(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("", "0.0.0.0", "::", "*")  # noqa: S104 (recognised, not bound)


def _prepare(config: Config) -> None:
    """Check what would otherwise fail at the first call, and clean up after a crash."""
    check_writable(config.spool_dir)
    remove_leftovers(config.spool_dir)
    if isinstance(config.target, SqliteTarget):
        _ensure_sqlite_file(config.target.path, config.data_dir)


def _ensure_sqlite_file(path: Path, data_dir: Path) -> None:
    """The embedded default database is created on first start; a configured one
    must exist, so that a typo in a path cannot become a new empty database."""
    if path.exists():
        return
    if path != data_dir / config_module.EMBEDDED_SQLITE_NAME:
        raise OSError(f"no SQLite database at {path}")
    log.info("creating the embedded SQLite database %s", path)
    sqlite3.connect(path).close()
    path.chmod(0o600)
