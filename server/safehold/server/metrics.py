"""Prometheus metrics for backups and restores, served on an optional port.

Counters of calls started, finished and failed (by reason), bytes moved and
durations; a scrape shows at once whether backups are running and succeeding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))


class Metrics:
    """The service's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            "Backup bytes sent or restore bytes applied",
            labels,
            registry=self.registry,
        )
        self._seconds = Histogram(
            "safehold_operation_duration_seconds",
            "Duration of successful backups and restores",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )

        self._refused = Counter(
            "safehold_auth_refusals",
            "BackupService calls refused before they ran: wrong password or too many attempts",
            ["reason"],
            registry=self.registry,
        )

    def started(self, operation: str) -> None:
        self._started.labels(operation).inc()

    def finished(self, operation: str, size: int, seconds: float) -> None:
        self._finished.labels(operation).inc()
        self._bytes.labels(operation).inc(size)
        self._seconds.labels(operation).observe(seconds)

    def failed(self, operation: str, reason: str) -> None:
        self._failed.labels(operation, reason).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def serve(self, listen: str) -> int:
        """Serve /metrics on host:port; the port actually bound."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        return int(server.server_port)
