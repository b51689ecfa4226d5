"""Pull a stream's next items in a thread of its own while the caller handles this one.

Both ends of a backup stream did everything in one thread, one chunk at a
time: the server read a chunk, hashed it and waited for gRPC to send it before
reading the next; the client asked gRPC for a chunk only after it had written
and hashed the previous one. Each side idled while the other worked (profiled
in docs/benchmarks.md). Reading (a file, a pipe, gRPC's receive) and hashing
or writing all release the GIL, so a second thread lets them overlap on two
cores. At most `depth` items wait in between, which bounds the memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_SECONDS = 0.1
"""How soon a producer blocked on a full queue notices that the consumer left."""


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


class _ReadAhead(Generic[T]):
    def __init__(self, source: Iterator[T], depth: int, each: Callable[[T], object]) -> None:
        self._source = source
        self._each = each
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._pull, name="read-ahead", daemon=True)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]

    def _pull(self) -> None:
        try:
            for item in self._source:
                self._each(item)
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, who raises it
            self._put(_Failed(exc))
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Queue item unless the consumer has gone; False when it has."""
        while not self._stopped.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
        return False


@contextlib.contextmanager
def read_ahead(
    source: Iterator[T], depth: int = 2, each: Callable[[T], object] = lambda _: None
) -> Iterator[Iterator[T]]:
    """Iterate source through a thread that stays up to depth items ahead and
    calls each(item) there first (hashing, so that it overlaps the caller's work
    too; an item reaches the caller only after each() has returned).

    Leaving the block tells the thread to stop without waiting for it: it may be
    blocked inside source (a pipe, a gRPC receive) until whoever owns that
    source ends it (kills the child, cancels the call) after this block.
    """
    ahead = _ReadAhead(source, depth, each)
    ahead._thread.start()
    try:
        yield iter(ahead)
    finally:
        ahead._stopped.set()
