"""How fast one address may have passwords checked: the guessing limiter.

Each address (an IPv4 address, or an IPv6 /64, since one host usually holds a
whole /64) has a budget in the form of GCRA (the generic cell rate algorithm):
`burst` checks at once, then one every `1 / rate` seconds. A check is paid
for *before* the password is compared, under one lock, so no number of
concurrent callers can get more checks than the budget; a call with the right
password gets its payment back. A call over budget waits for its turn in its
own worker thread, if the wait is short and one of the few sleeping places is
free, and is otherwise refused at once, without its password being compared.

The state is one float per address (no counter that can overflow), kept in a
table of bounded size that forgets the least recently seen address first.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

log = logging.getLogger(__name__)


class Verdict(Enum):
    """What the limiter decided about one call."""

    CHECK = "check"
    """Compare the password now (after any wait the limiter already slept)."""
    REFUSE = "refuse"
    """Over budget and no short wait possible: refuse without comparing."""


class GuessLimiter:
    """A per-address budget of password checks; see the module docstring."""

    def __init__(
        self,
        *,
        rate: float = 2.0,
        burst: int = 5,
        max_wait: float = 2.0,
        max_sleepers: int = 4,
        max_tracked: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self._tolerance = self.interval * (burst - 1)
        self.max_wait = max_wait
        self._max_tracked = max_tracked
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._due: OrderedDict[str, float] = OrderedDict()
        """Per address: the theoretical time of its next check (GCRA's TAT)."""
        self._sleepers = threading.BoundedSemaphore(max_sleepers)

    def admit(self, key: str) -> Verdict:
        """Pay for one check from key, sleeping first when its turn is near."""
        if not self._sleepers.acquire(blocking=False):
            # Every sleeping place is taken: only a call that needs no wait may go.
            return self._reserve(key, max_wait=0.0)[0]
        try:
            verdict, wait = self._reserve(key, max_wait=self.max_wait)
            if wait > 0:
                self._sleep(wait)
            return verdict
        finally:
            self._sleepers.release()

    def refund(self, key: str) -> None:
        """The password was right: the check it paid for is given back."""
        with self._lock:
            due = self._due.get(key)
            if due is not None:
                self._due[key] = due - self.interval

    def tracked(self) -> int:
        """How many addresses the table holds (for tests and the log)."""
        with self._lock:
            return len(self._due)

    def _reserve(self, key: str, max_wait: float) -> tuple[Verdict, float]:
        now = self._clock()
        with self._lock:
            due = max(self._due.get(key, now), now)
            wait = max(0.0, due - self._tolerance - now)
            if wait > max_wait:
                return Verdict.REFUSE, 0.0
            self._due[key] = due + self.interval
            self._due.move_to_end(key)
            while len(self._due) > self._max_tracked:
                self._due.popitem(last=False)
            return Verdict.CHECK, wait


def address_key(peer: str) -> str:
    """The limiter's key for a gRPC peer string: the address without its port,
    an IPv6 address widened to its /64 (an IPv4-mapped one is its IPv4 address)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if address.ipv4_mapped:  # an IPv4 client of a dual-stack listener
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return kind  # unix sockets and the like: one key for all


class RefusalLog:
    """Logs refusals in summary: the first at once, then at most one line per
    `every` seconds with the counts since, so a flood cannot fill the disk; the
    counts of a flood that stops are logged when its period ends."""

    def __init__(
        self,
        subject: str,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        self._subject = subject
        self._every = every
        self._clock = clock
        self._schedule = schedule or _later
        self._lock = threading.Lock()
        self._last: float | None = None
        self._pending = False
        self._counts: dict[str, int] = {}
        self._addresses: set[str] = set()
        self._reasons: set[str] = set()

    def refused(self, key: str, why: str, reason: str = "") -> None:
        """Count one refusal of why ("wrong password", "throttled") from key; reason
        (an ErrorInfo reason) goes into the summary line's own field."""
        now = self._clock()
        with self._lock:
            self._counts[why] = self._counts.get(why, 0) + 1
            self._addresses.add(key)
            if reason:
                self._reasons.add(reason)
            if self._last is not None and now - self._last < self._every:
                if not self._pending:
                    self._pending = True
                    self._schedule(self._every - (now - self._last), self.flush)
                return
            line, fields = self._take(now)
        log.warning("%s", line, extra=fields)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        with self._lock:
            self._pending = False
            taken = self._take(self._clock()) if self._counts else None
        if taken:
            log.warning("%s", taken[0], extra=taken[1])

    def _take(self, now: float) -> tuple[str, dict[str, str]]:
        """The summary line, and its details as fields of their own (JSON logs)."""
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self._counts.items()))
        addresses = sorted(self._addresses)
        more = f" and {len(addresses) - 5} more" if len(addresses) > 5 else ""
        fields = {"reason": ",".join(sorted(self._reasons)), "peer": ", ".join(addresses[:5])}
        self._last = now
        self._counts.clear()
        self._addresses.clear()
        self._reasons.clear()
        line = f"refused {self._subject}: {counts} (from {', '.join(addresses[:5])}{more})"
        return line, fields


def _later(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
