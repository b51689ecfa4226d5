"""Ends an upload whose client stays connected but stops sending.

gRPC keepalive catches dead connections; a live client that simply goes quiet
would otherwise hold a worker thread, the restore lock and a spool file for
ever. The watchdog cancels such a call once nothing has arrived for a while.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


class IdleWatchdog(Iterator[T]):
    """The request iterator of a call, cancelled after `timeout` seconds of silence."""

    def __init__(self, requests: Iterator[T], context: grpc.ServicerContext, timeout: float):
        self.timeout = timeout
        self.fired = False
        self._requests = requests
        self._context = context
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="upload-watchdog", daemon=True)

    def __enter__(self) -> IdleWatchdog[T]:
        if self.timeout > 0:
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __next__(self) -> T:
        item = next(self._requests)
        self._last = time.monotonic()
        return item

    def stop(self) -> None:
        """The upload is over: stop watching."""
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self._last > self.timeout:
                self.fired = True
                log.warning("no data from the client for %gs: ending its upload", self.timeout)
                self._context.cancel()  # type: ignore[no-untyped-call]
                return
