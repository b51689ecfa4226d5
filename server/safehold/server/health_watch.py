"""BackupService's health follows its database; the server's own stays SERVING.

A load balancer then tells "process down" (no answer, or "" NOT_SERVING while
stopping) from "database down" (safehold.v1.BackupService NOT_SERVING). The
database is asked cheaply (one connection and `SELECT 1`, or opening the SQLite
file) every interval, and the status flips only after the same answer twice in
a row, so one slow probe does not make it flap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from safehold.contract import SERVICE_NAME
from safehold.server.errors import SafeholdError

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGREEING_PROBES = 2
"""How many probes in a row must agree before the status changes."""


class DatabaseHealth:
    """A daemon thread that probes the database and sets BackupService's status."""

    def __init__(
        self, probe: Callable[[], None], servicer: health.HealthServicer, interval: float
    ) -> None:
        self._probe = probe
        self._servicer = servicer
        self._interval = interval
        self._stop = threading.Event()
        self._serving = True
        self._streak = 0
        self._thread = threading.Thread(target=self._run, name="safehold-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enter_graceful_shutdown(self) -> None:
        """Stop probing and answer NOT_SERVING for everything from now on."""
        self._stop.set()
        self._servicer.enter_graceful_shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.probe_once()

    def probe_once(self) -> None:
        """One probe; flip the status when AGREEING_PROBES in a row disagree with it."""
        problem = None
        try:
            self._probe()
        except SafeholdError as err:
            problem = err.message
        except Exception as exc:  # a probe must never end the thread
            problem = f"{type(exc).__name__}: {exc}"
        healthy = problem is None
        self._streak = 0 if healthy == self._serving else self._streak + 1
        if self._streak < AGREEING_PROBES or self._stop.is_set():
            return
        self._serving, self._streak = healthy, 0
        self._servicer.set(SERVICE_NAME, SERVING if healthy else NOT_SERVING)
        if healthy:
            log.info("the database answers again: %s is SERVING", SERVICE_NAME)
        else:
            log.warning(
                "the database cannot be reached (%s): %s is NOT_SERVING", problem, SERVICE_NAME
            )
