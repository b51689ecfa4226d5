"""Prometheus metrics for backups and restores, served on an optional port.

Every series exists from start, at zero, so that an alert on "finished_total
not increasing" or on a rising failure count sees the series after a restart.
Bytes are counted as they flow, running calls show in a gauge, refusals (wrong
password, too many backups, a restore already running) have their own counter,
and the process's CPU, memory and file descriptors come with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from safehold.contract import Reason

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))
OPERATIONS = ("backup", "restore")
REFUSALS = (
    Reason.UNAUTHENTICATED,
    Reason.TOO_MANY_ATTEMPTS,
    Reason.SERVER_BUSY,
    Reason.TOO_MANY_BACKUPS,
    Reason.RESTORE_IN_PROGRESS,
    Reason.UPLOAD_TOO_LARGE,
    Reason.SHUTTING_DOWN,
)
"""Reasons that turn a call away before it does any work."""
_CLIENT_ONLY = {Reason.FILE_NOT_READABLE, Reason.TLS_MISCONFIGURED, Reason.NO_PASSWORD}


class Metrics:
    """The service's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
            self.registry.register(collector)
        labels = ["operation"]
        self._started = Counter(
            "safehold_operations_started",
            "Backups and restores started",
            labels,
            registry=self.registry,
        )
        self._finished = Counter(
            "safehold_operations_finished",
            "Backups and restores that succeeded",
            labels,
            registry=self.registry,
        )
        self._failed = Counter(
            "safehold_operations_failed",
            "Backups and restores that failed, by ErrorInfo reason",
            [*labels, "reason"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "safehold_bytes",
            "Backup bytes sent and restore bytes received, counted as they flow",
            labels,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "safehold_operations_in_flight",
            "Backups and restores running now",
            labels,
            registry=self.registry,
        )
        self._refused = Counter(
            "safehold_refusals",
            "Calls turned away before doing any work, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "safehold_operation_duration_seconds",
            "Duration of successful backups and restores",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        for operation in OPERATIONS:
            for per_operation in (
                self._started,
                self._finished,
                self._bytes,
                self._in_flight,
                self._seconds,
            ):
                per_operation.labels(operation)
            for reason in Reason:
                if reason not in _CLIENT_ONLY:
                    self._failed.labels(operation, reason.value)
        for reason in REFUSALS:
            self._refused.labels(reason.value)

    def started(self, operation: str) -> None:
        self._started.labels(operation).inc()

    @contextlib.contextmanager
    def running(self, operation: str) -> Iterator[None]:
        """Counts the call in the in-flight gauge while it runs."""
        with self._in_flight.labels(operation).track_inprogress():
            yield

    def moved(self, operation: str, size: int) -> None:
        """size more bytes went through, whether or not the call ends well."""
        self._bytes.labels(operation).inc(size)

    def finished(self, operation: str, seconds: float) -> None:
        self._finished.labels(operation).inc()
        self._seconds.labels(operation).observe(seconds)

    def failed(self, operation: str, reason: str) -> None:
        self._failed.labels(operation, reason).inc()
        if reason in REFUSALS:
            self.refused(reason)

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def serve(self, listen: str) -> int:
        """Serve /metrics on host:port; the port actually bound."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        return int(server.server_port)
