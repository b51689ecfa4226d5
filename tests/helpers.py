"""A real safehold server in a subprocess, and raw-stub helpers for tests.

Tests talk to the server as any client would: over gRPC on loopback. The
server's log goes to a file that each test can read; every stop checks that
the password never reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import grpc

from safehold.contract import PASSWORD_METADATA_KEY
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc

SAFEHOLD = str(Path(sys.executable).parent / "safehold")
_LISTENING = re.compile(r"listening on \S+ \(port (\d+)\)")


@dataclass
class Server:
    """A running `safehold serve` process."""

    process: subprocess.Popen[bytes]
    port: int
    password: str
    log_path: Path
    data_dir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        """Stop the server; its exit code. Fails the test if the password was logged."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("the server did not stop in time") from None
        assert_secret_not_in(self.password, self.log())
        return self.process.returncode

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self) -> pb_grpc.BackupServiceStub:
        return pb_grpc.BackupServiceStub(self.channel())

    def metadata(self, password: str | None = None) -> tuple[tuple[str, str], ...]:
        return ((PASSWORD_METADATA_KEY, self.password if password is None else password),)

    def client_env(self) -> dict[str, str]:
        """Environment for the CLI as a user would set it."""
        return {**os.environ, "SAFEHOLD_TARGET": self.target, "SAFEHOLD_PASSWORD": self.password}


def secret_forms(secret: str) -> set[str]:
    """Every spelling of secret a log line can carry: as is, JSON-escaped (once,
    or twice when a JSON line is logged inside another), Python's repr of the
    str and of its bytes, and URL-encoded (as in a database URL or a query)."""
    once = json.dumps(secret)[1:-1]
    forms = {
        secret,
        once,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(once)[1:-1],
        repr(secret)[1:-1],
        repr(secret.encode())[2:-1],
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
    }
    return {form for form in forms if form}


def assert_secret_not_in(secret: str, text: str) -> None:
    """Fail if any spelling of secret appears in text (a log, an error, a listing)."""
    found = sorted(form for form in secret_forms(secret) if form in text)
    assert not found, f"the password reached the log, spelled {len(found)} way(s)"


def start_server(
    tmp: Path,
    database_url: str,
    password: str,
    *extra_args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    """Start `safehold serve` on a free loopback port and wait until it listens."""
    data_dir = tmp / "safehold-data"
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    environ = {
        **os.environ,
        "SAFEHOLD_DATABASE_URL": database_url,
        "SAFEHOLD_PASSWORD": password,
        "SAFEHOLD_DATA_DIR": str(data_dir),
        **(env or {}),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [SAFEHOLD, "serve", "--listen", "127.0.0.1:0", *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=cwd,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if match := _LISTENING.search(log_path.read_text(errors="replace")):
            return Server(process, int(match.group(1)), password, log_path, data_dir)
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the server did not start: {log_path.read_text()}")


def sqlite_content(path: Path) -> list[str]:
    """The whole logical content of a SQLite database, for exact comparison."""
    with sqlite3.connect(path) as db:
        return list(db.iterdump())


def altered_copy(db: Path, dest: Path) -> bytes:
    """A copy of db with every game renamed, as bytes to upload: applied, it
    would change the database, so a test that asserts "unchanged" can fail."""
    shutil.copyfile(db, dest)
    with contextlib.closing(sqlite3.connect(dest)) as conn, conn:
        conn.execute("UPDATE games SET title = title || ' (uploaded)'")
    assert sqlite_content(dest) != sqlite_content(db)
    return dest.read_bytes()


def add_filler(db: Path, megabytes: int) -> None:
    """Grow a SQLite database by incompressible rows, so streams take a while."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (b BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(100000))", [()] * (megabytes * 10))


def frames(
    data: bytes,
    *,
    engine: pb.Engine.ValueType = pb.ENGINE_UNSPECIFIED,
    chunk: int = 64 * 1024,
    trailer: pb.Digest | None = None,
    with_trailer: bool = True,
) -> list[pb.RestoreRequest]:
    """A restore upload of data, with a correct trailer unless told otherwise."""
    out = [pb.RestoreRequest(header=pb.RestoreHeader(engine=engine))]
    out += [pb.RestoreRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    if with_trailer:
        digest = trailer or pb.Digest(size_bytes=len(data), sha256=hashlib.sha256(data).digest())
        out.append(pb.RestoreRequest(trailer=digest))
    return out


def raw_restore(
    server: Server, requests: Iterable[pb.RestoreRequest], password: str | None = None
) -> tuple[list[pb.RestoreResponse], grpc.RpcError | None]:
    """Run a restore with the raw stub: the responses, and the error it ended with."""
    responses: list[pb.RestoreResponse] = []
    with server.channel() as channel:
        stub = pb_grpc.BackupServiceStub(channel)
        try:
            for response in stub.Restore(iter(requests), metadata=server.metadata(password)):
                responses.append(response)
        except grpc.RpcError as err:
            return responses, err
    return responses, None


def error_reason(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    """Code, ErrorInfo reason and database_state of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {err}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return err.code(), info.reason, info.metadata.get("database_state", "")
    raise AssertionError(f"no ErrorInfo in {status}")


def run_cli(
    *args: str, env: Mapping[str, str], input_text: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the `safehold` command as a user would, without a terminal."""
    return subprocess.run(
        [SAFEHOLD, *args],
        env=dict(env),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spool_leftovers(server: Server) -> list[str]:
    spool = server.data_dir / "spool"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def held_before_trailer(
    items: Iterable[pb.RestoreRequest], gate: threading.Event
) -> Iterator[pb.RestoreRequest]:
    """Yield items, holding the trailer back until gate is set."""
    for item in items:
        if item.WhichOneof("frame") == "trailer":
            gate.wait(30)
        yield item


def children_named(parent: int, name: str) -> list[int]:
    """Pids of parent's child processes running the program called name."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and any(Path(arg.decode()).name == name for arg in cmdline[:1]):
            found.append(int(entry.name))
    return found


def holds_write_lock(db: Path, pid: int) -> bool:
    """Whether process pid holds a write lock on db (SQLite's RESERVED or
    PENDING lock, as /proc/locks shows it): a writer has begun on db."""
    inode = db.stat().st_ino
    return any(
        fields[3] == "WRITE" and fields[4] == str(pid) and fields[5].endswith(f":{inode}")
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
        if len(fields) > 5
    )


def wait_until_writing(db: Path, pid: int) -> None:
    """Wait until process pid has begun to write db: a replace held by a
    reader's transaction waits there holding its write lock."""
    deadline = time.monotonic() + 20
    while not holds_write_lock(db, pid):
        assert time.monotonic() < deadline, "the replace never began"
        time.sleep(0.02)
