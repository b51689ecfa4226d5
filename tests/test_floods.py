"""No caller, with or without the password, can lock out, starve or stall the
service: floods of the open services, password guessing at any concurrency.
Real server, real gRPC on loopback; the second address is ::1."""

from __future__ import annotations

import collections
import re
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import Server, error_reason, sqlite_content, start_server

from safehold.client import Busy, Client
from safehold.contract import PASSWORD_METADATA_KEY
from safehold.server.limiter import GuessLimiter
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

STALL = 5.0
LIMITS = GuessLimiter()
"""The server's own defaults: the bound the tests assert is the limiter's promise."""
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""Channels to one target share a connection unless told otherwise."""


@pytest.fixture
def open_server(tmp_path: Path, sqlite_db: Path) -> Iterator[Server]:
    """Reflection on, a short stall timeout, listening on 127.0.0.1 and ::1."""
    server = start_server(
        tmp_path,
        f"sqlite:///{sqlite_db}",
        PASSWORD,
        "--listen",
        "localhost:0",
        "--reflection",
        "--stall-timeout",
        str(STALL),
        "--metrics-listen",
        "127.0.0.1:0",
    )
    yield server
    server.stop()


def passwords_compared(server: Server) -> int:
    """How many wrong passwords the server compared, from its own metrics."""
    port = re.search(r"metrics on \S+ \(port (\d+)\)", server.log())
    assert port, server.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as page:
        scrape = page.read().decode()
    found = re.search(r'^safehold_refusals_total\{reason="UNAUTHENTICATED"\} (\S+)$', scrape, re.M)
    return int(float(found.group(1))) if found else 0


def _never(stop: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
    """A request stream that is opened and never sent on."""
    stop.wait(60)
    return
    yield  # a generator


class Endings:
    """How held streams ended, counted by status code across threads."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def hold(self, call: Iterator[object]) -> None:
        """Keep a stream open until the server ends it; note how it ended."""
        try:
            for _ in call:
                pass
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        with self._lock:
            self.codes[code] += 1


def test_floods_of_the_open_services_neither_lock_out_nor_last(
    open_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    stop = threading.Event()
    channels = [grpc.insecure_channel(open_server.target, options=OWN_CONNECTION) for _ in range(6)]
    endings = Endings()
    outcomes = endings.codes
    calls: list[Iterator[object]] = []
    for i in range(40):
        channel = channels[i % len(channels)]
        calls.append(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(_never(stop))
        )
        calls.append(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()))
    flood = [threading.Thread(target=endings.hold, args=(call,)) for call in calls]
    for thread in flood:
        thread.start()
    try:
        # Four places each: the rest are refused at once, the held ones stay.
        deadline = time.monotonic() + STALL
        while outcomes["RESOURCE_EXHAUSTED"] < 72 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outcomes == {"RESOURCE_EXHAUSTED": 72}, outcomes
        with Client(open_server.target, PASSWORD, attempts=1) as client:
            expected = sqlite_content(sqlite_db)
            backup = client.backup(tmp_path / "during-flood.sqlite")
            with sqlite3.connect(sqlite_db) as db:
                db.execute("DELETE FROM progress")
            client.restore(backup.path)
            assert sqlite_content(sqlite_db) == expected
            assert client.server_info().engine == "SQLite"
        with grpc.insecure_channel(open_server.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert outcomes == {"RESOURCE_EXHAUSTED": 72}, "the flood ended too early to prove it"
        for thread in flood:  # the floods end: the server ends every stream
            thread.join(STALL + 10)
        assert not any(thread.is_alive() for thread in flood)
        assert outcomes == {"RESOURCE_EXHAUSTED": 72, "CANCELLED": 8}, outcomes
    finally:
        stop.set()
        for channel in channels:
            channel.close()
    log = open_server.log()
    assert log.count("refused calls over their group's places") <= 2, log


def _guessing(open_server: Server, threads: int, timeout: float | None) -> None:
    """Guess from 127.0.0.1 past 2,000 refusals while the right password is used
    from ::1; check the limiter's promise and the honest caller's speed."""
    outcomes: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + 120

    def guesser() -> None:
        with grpc.insecure_channel(open_server.target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.BackupServiceStub(channel)
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    stub.GetServerInfo(
                        pb.GetServerInfoRequest(),
                        metadata=((PASSWORD_METADATA_KEY, "guess"),),
                        timeout=timeout,
                    )
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                    if code == "RESOURCE_EXHAUSTED":
                        with lock:
                            reasons[error_reason(err)[1]] += 1
                with lock:
                    outcomes[code] += 1
                    if sum(outcomes.values()) >= 2000:
                        stop.set()

    honest: list[float] = []
    started = time.monotonic()
    attackers = [threading.Thread(target=guesser) for _ in range(threads)]
    for attacker in attackers:
        attacker.start()
    try:
        with Client(f"[::1]:{open_server.port}", PASSWORD, attempts=1) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                began = time.monotonic()
                assert client.server_info().engine == "SQLite"
                honest.append(time.monotonic() - began)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(30)
    assert sum(outcomes.values()) >= 2000, outcomes  # not cut short by the 120 s bound
    assert set(outcomes) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    # Refused at once, without a comparison, as too many attempts (never a free guess).
    assert set(reasons) <= {"TOO_MANY_ATTEMPTS"}, reasons
    assert threads == 1 or reasons["TOO_MANY_ATTEMPTS"] > 0, outcomes
    # Up to now the server compared no more passwords than the limiter's budget
    # for the time taken: the burst and one per interval (calls that timed out
    # on the client side may have been compared too, and are counted).
    elapsed = time.monotonic() - started
    compared = passwords_compared(open_server)
    assert outcomes["UNAUTHENTICATED"] <= compared
    assert compared <= LIMITS.burst + elapsed / LIMITS.interval + 1, (compared, outcomes, elapsed)
    assert len(honest) > 20 and max(honest) < 0.5, honest
    log = open_server.log()
    assert log.count("refused BackupService calls") <= 2 + elapsed / 10, log
    assert len(log.splitlines()) < 50


def test_guessing_from_one_thread_is_slow_and_never_unknown(open_server: Server) -> None:
    """One thread that gives up on each call after 20 ms, as a fast guesser would."""
    _guessing(open_server, threads=1, timeout=0.02)


def test_guessing_from_sixteen_threads_is_no_faster(open_server: Server) -> None:
    _guessing(open_server, threads=16, timeout=None)


def test_health_answers_while_backup_service_is_full(open_server: Server) -> None:
    """32 restores (the password, then nothing) fill BackupService's places: a 33rd
    call is refused at once, health checks still answer, and the stalled ones end."""
    stop = threading.Event()
    channels = [grpc.insecure_channel(open_server.target, options=OWN_CONNECTION) for _ in range(3)]
    endings = Endings()
    codes = endings.codes
    calls = [
        pb_grpc.BackupServiceStub(channels[i % 3]).Restore(
            _never(stop), metadata=open_server.metadata()
        )
        for i in range(32)
    ]
    stalled = [threading.Thread(target=endings.hold, args=(call,)) for call in calls]
    for thread in stalled:
        thread.start()
    try:
        with Client(f"[::1]:{open_server.port}", PASSWORD, attempts=1) as client:
            refused: list[str] = []

            def full() -> bool:
                try:
                    client.server_info()
                except Busy as err:
                    refused.append(err.reason)
                    return True
                return False

            deadline = time.monotonic() + STALL
            while not full():
                assert time.monotonic() < deadline, "BackupService never filled up"
                time.sleep(0.02)
            assert refused == ["SERVER_BUSY"]
        with grpc.insecure_channel(open_server.target, options=OWN_CONNECTION) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert codes == {}, "the stalled calls ended too early to prove it"
        for thread in stalled:
            thread.join(STALL + 10)
        assert codes == {"CANCELLED": 32}, codes
    finally:
        stop.set()
        for channel in channels:
            channel.close()
