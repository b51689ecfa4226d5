"""The guessing limiter on a fixed clock: its budget, its waits, its table."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from safehold.server.limiter import GuessLimiter, RefusalLog, Verdict, address_key


class FakeClock:
    """A clock that moves only when something sleeps or the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, **kwargs: float) -> GuessLimiter:
    options: dict[str, float] = {"rate": 2.0, "burst": 5, "max_wait": 2.0, **kwargs}
    return GuessLimiter(
        rate=options["rate"],
        burst=int(options["burst"]),
        max_wait=options["max_wait"],
        max_tracked=int(options.get("max_tracked", 100)),
        clock=clock,
        sleep=clock.sleep,
    )


def test_burst_then_one_check_per_interval() -> None:
    clock = FakeClock()
    guard = limiter(clock)
    start = clock.now
    for _ in range(5):
        assert guard.admit("a") is Verdict.CHECK
    assert clock.now == start  # the burst needs no wait
    for _ in range(2000):
        assert guard.admit("a") is Verdict.CHECK
    # 2,000 checks past the burst took 2,000 intervals: no overflow, no shortcut.
    assert clock.now - start == 2000 * guard.interval


def test_over_budget_without_time_to_wait_is_refused_and_not_charged() -> None:
    clock = FakeClock()
    guard = limiter(clock, max_wait=0.0)
    verdicts = [guard.admit("a") for _ in range(50)]
    assert verdicts.count(Verdict.CHECK) == 5
    clock.now += guard.interval  # refusals did not push its turn back
    assert guard.admit("a") is Verdict.CHECK


def test_refund_gives_the_right_password_its_check_back() -> None:
    clock = FakeClock()
    guard = limiter(clock, max_wait=0.0)
    for _ in range(100):
        assert guard.admit("a") is Verdict.CHECK
        guard.refund("a")


def test_other_addresses_keep_their_own_budget() -> None:
    clock = FakeClock()
    guard = limiter(clock, max_wait=0.0)
    while guard.admit("attacker") is Verdict.CHECK:
        pass
    assert all(guard.admit("honest") is Verdict.CHECK for _ in range(5))


def test_least_recently_seen_address_is_forgotten_first() -> None:
    clock = FakeClock()
    guard = limiter(clock, max_wait=0.0, max_tracked=3)
    for key in ("old", "kept", "b"):
        for _ in range(5):
            guard.admit(key)
    guard.admit("kept")  # seen again: now the most recent
    guard.admit("c")  # the table is full: "old" goes, not everything
    assert guard.tracked() == 3
    assert guard.admit("kept") is Verdict.REFUSE  # still over budget
    assert guard.admit("old") is Verdict.CHECK  # forgotten


def test_concurrent_callers_get_no_more_than_the_budget() -> None:
    """64 threads at once on a frozen clock: exactly the burst is checked."""
    clock = FakeClock()
    guard = GuessLimiter(rate=2.0, burst=5, max_wait=0.0, clock=clock, sleep=clock.sleep)
    verdicts: list[Verdict] = []
    barrier = threading.Barrier(64)

    def call() -> None:
        barrier.wait()
        for _ in range(10):
            verdicts.append(guard.admit("a"))

    threads = [threading.Thread(target=call) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(verdicts) == 640
    assert verdicts.count(Verdict.CHECK) == 5


def test_sleepers_full_means_refused_at_once() -> None:
    """While every sleeping place is taken, a call that would wait is refused."""
    clock = FakeClock()
    release = threading.Event()
    asleep = threading.Semaphore(0)

    def sleep(seconds: float) -> None:
        asleep.release()
        release.wait(30)

    guard = GuessLimiter(rate=2.0, burst=1, max_wait=5.0, max_sleepers=2, clock=clock, sleep=sleep)
    assert guard.admit("a") is Verdict.CHECK
    sleepers = [threading.Thread(target=guard.admit, args=("a",)) for _ in range(2)]
    for thread in sleepers:
        thread.start()
    for _ in sleepers:
        assert asleep.acquire(timeout=10)
    assert guard.admit("a") is Verdict.REFUSE
    release.set()
    for thread in sleepers:
        thread.join(10)


def test_address_keys() -> None:
    assert address_key("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert address_key("ipv6:[::1]:5555") == "::/64"
    assert address_key("ipv6:[2001:db8:1:2:aaaa::1]:443") == address_key(
        "ipv6:[2001:db8:1:2:bbbb::9]:443"
    )
    assert address_key("ipv6:[2001:db8:1:3::1]:443") != address_key("ipv6:[2001:db8:1:2::1]:443")
    assert address_key("ipv6:[::ffff:192.0.2.7]:443") == "192.0.2.7"
    assert address_key("ipv6:[::ffff:192.0.2.8]:443") == "192.0.2.8"
    assert address_key("ipv6:[fe80::1%eth0]:443") == "fe80::/64"
    assert address_key("unix:/run/safehold.sock") == "unix"


def test_refusals_are_logged_in_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    scheduled: list[tuple[float, Callable[[], None]]] = []
    summary = RefusalLog(
        "BackupService calls",
        every=10.0,
        clock=clock,
        schedule=lambda delay, action: scheduled.append((delay, action)),
    )
    start = clock.now
    with caplog.at_level(logging.WARNING, logger="safehold.server.limiter"):
        for _ in range(1000):
            summary.refused("10.0.0.1", "wrong password")
            clock.now += 0.001
        ((delay, flush),) = scheduled  # one flush for the whole burst, due when its period ends
        clock.now = start + delay + 0.001
        flush()
        clock.now += 1
        for n in range(8):  # a flood from many addresses that stops
            summary.refused(f"10.0.1.{n}", "throttled")
        assert len(scheduled) == 2 and scheduled[1][0] == pytest.approx(9.0)
        clock.now += scheduled[1][0]
        scheduled[1][1]()
        scheduled[1][1]()  # nothing new: no line
    assert [r.getMessage() for r in caplog.records] == [
        "refused BackupService calls: 1 wrong password (from 10.0.0.1)",
        "refused BackupService calls: 999 wrong password (from 10.0.0.1)",
        "refused BackupService calls: 8 throttled "
        "(from 10.0.1.0, 10.0.1.1, 10.0.1.2, 10.0.1.3, 10.0.1.4 and 3 more)",
    ]
