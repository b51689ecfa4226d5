"""Ends an upload whose client stays connected but stops sending.

gRPC keepalive catches dead connections; a live client that simply goes quiet
would otherwise hold a worker thread, the restore lock and a spool file for
ever. The watchdog cancels such a call once nothing has arrived for a while.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
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
                log.warning("no data from the client for %gs: ending its call", self.timeout)
                self._context.cancel()  # type: ignore[no-untyped-call]
                return


class StallWatchdog:
    """Cancels a response stream whose client stops receiving.

    gRPC's sync server resumes a response generator only once flow control
    has let its last message go, so a generator left suspended at a yield
    for `timeout` seconds means the client has stopped reading (after the
    transport's buffers filled). Cancelling the call makes gRPC drop the
    generator, whose cleanup then kills pg_dump or deletes the SQLite
    snapshot and frees its backup slot. Time spent producing a message is
    not counted: pg_dump's own waits have their own bound.
    """

    def __init__(self, context: grpc.ServicerContext, timeout: float) -> None:
        self.timeout = timeout
        self.fired = False
        self._context = context
        self._suspended_since: float | None = None
        self._stopped = threading.Event()

    def watch(self, responses: Generator[T, None, None]) -> Iterator[T]:
        """Yield responses, cancelling the call when one is not taken in time."""
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()
        try:
            for item in responses:
                self._suspended_since = time.monotonic()
                yield item
                self._suspended_since = None
        finally:
            self._stopped.set()
            responses.close()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout / 4)):
            since = self._suspended_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fired = True
                log.warning("the client received nothing for %gs: ending its stream", self.timeout)
                self._context.cancel()  # type: ignore[no-untyped-call]
                return
