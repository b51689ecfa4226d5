"""Where `safehold backup -o` writes, as a user runs it: directories, files,
streams; never over an existing file unless told, never outside the chosen
directory, never bytes of another format than announced, nothing left by a kill.

Lying servers are real gRPC servers on loopback with a hand-written servicer.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import SAFEHOLD, Server, run_cli, sqlite_content

from safehold.contract import SERVICE_NAME
from safehold.files import PARTIAL_MARK
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc


def backups_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_directory_output_is_created_and_never_overwritten(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    env = sqlite_server.client_env()
    directory = tmp_path / "backups"
    for _ in range(2):  # both in the same second: the same suggested name
        done = run_cli("backup", "-o", f"{directory}/", env=env)
        assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = backups_in(directory)
    files = [directory / n for n in names if n.endswith(".sqlite")]
    assert len(names) == 4 and len(files) == 2, names
    for file in files:
        assert sqlite_content(file) == sqlite_content(sqlite_db)
        assert (directory / (file.name + ".manifest.json")).exists()

    existing = tmp_path / "existing"  # an existing directory needs no slash
    existing.mkdir()
    done = run_cli("backup", "-o", str(existing), env=env)
    assert done.returncode == 0, done.stderr
    assert len(backups_in(existing)) == 2


def test_named_file_is_replaced_only_with_force(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    env = sqlite_server.client_env()
    out = tmp_path / "app.sqlite.bak"
    assert run_cli("backup", "-o", str(out), env=env).returncode == 0
    first = out.read_bytes()
    with sqlite3.connect(sqlite_db) as db:
        db.execute("DELETE FROM progress")

    refused = run_cli("backup", "-o", str(out), env=env)
    assert refused.returncode == 1 and "exists; pass --force" in refused.stderr
    assert out.read_bytes() == first

    forced = run_cli("backup", "-o", str(out), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert sqlite_content(out) == sqlite_content(sqlite_db)
    sidecar = json.loads((tmp_path / "app.sqlite.bak.manifest.json").read_text())
    assert sidecar["size_bytes"] == out.stat().st_size
    assert sidecar["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sidecar["engine"] == "SQLite" and sidecar["dump_format"] == "DUMP_FORMAT_SQLITE_FILE"
    assert sidecar["engine_version"] == sqlite3.sqlite_version and sidecar["safehold_version"]


@pytest.mark.parametrize("output", ["-", "/dev/stdout"])  # "-": the command README.md shows
def test_stdout_streams_into_a_pipe(
    output: str, sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"safehold backup -o {output} | gzip > app.sqlite.gz"],
        cwd=work,
        env={
            **sqlite_server.client_env(),
            "PATH": f"{Path(SAFEHOLD).parent}:{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"saved to {output}" in done.stderr and done.stdout == ""
    subprocess.run(["gunzip", "app.sqlite.gz"], cwd=work, check=True)
    assert sqlite_content(work / "app.sqlite") == sqlite_content(sqlite_db)


def test_fifo_is_written_not_replaced(
    sqlite_server: Server, sqlite_db: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    done = run_cli("backup", "-o", str(fifo), env=sqlite_server.client_env())
    reader.join(30)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(received[0])
    assert sqlite_content(copy) == sqlite_content(sqlite_db)


class LyingServicer(pb_grpc.BackupServiceServicer):
    """Sends whatever manifest and bytes a test sets, with a correct trailer;
    or, when `hold` is set, stops after the first chunk until it is released."""

    def __init__(self) -> None:
        self.manifest = pb.BackupManifest()
        self.data = b""
        self.hold: threading.Event | None = None
        self.fail_after_data = False
        self.calls = 0

    def Backup(
        self, request: pb.BackupRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BackupResponse]:
        self.calls += 1
        yield pb.BackupResponse(manifest=self.manifest)
        for i in range(0, len(self.data), 64 * 1024):
            yield pb.BackupResponse(chunk=self.data[i : i + 64 * 1024])
            if self.hold is not None:
                self.hold.wait(30)
        if self.fail_after_data:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")
        yield pb.BackupResponse(
            trailer=pb.Digest(size_bytes=len(self.data), sha256=hashlib.sha256(self.data).digest())
        )


@pytest.fixture
def liar(sqlite_db: Path) -> Iterator[tuple[LyingServicer, dict[str, str]]]:
    servicer = LyingServicer()  # type: ignore[abstract]  # only Backup is needed
    servicer.manifest = pb.BackupManifest(
        engine=pb.ENGINE_SQLITE,
        dump_format=pb.DUMP_FORMAT_SQLITE_FILE,
        engine_version="3",
        database_name="app",
        suggested_file_name="app.sqlite",
    )
    servicer.data = sqlite_db.read_bytes()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_BackupServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {**os.environ, "SAFEHOLD_TARGET": f"127.0.0.1:{port}", "SAFEHOLD_PASSWORD": "x"}
    yield servicer, env
    if servicer.hold is not None:
        servicer.hold.set()
    server.stop(0).wait()


@pytest.mark.parametrize(
    ("engine", "dump_format", "data"),
    [
        (pb.ENGINE_POSTGRESQL, pb.DUMP_FORMAT_PG_CUSTOM, None),  # SQLite bytes as pg_dump
        (pb.ENGINE_SQLITE, pb.DUMP_FORMAT_UNSPECIFIED, b"28 bytes of plain text here\n"),
        (pb.ENGINE_SQLITE, pb.DUMP_FORMAT_SQLITE_FILE, b"28 bytes of plain text here\n"),
        (pb.ENGINE_SQLITE, pb.DUMP_FORMAT_PG_CUSTOM, None),  # engine and format disagree
    ],
)
def test_bytes_of_another_format_are_never_saved(
    liar: tuple[LyingServicer, dict[str, str]],
    tmp_path: Path,
    engine: pb.Engine.ValueType,
    dump_format: pb.DumpFormat.ValueType,
    data: bytes | None,
) -> None:
    servicer, env = liar
    servicer.manifest.engine = engine
    servicer.manifest.dump_format = dump_format
    servicer.data = data or servicer.data
    out = tmp_path / "out"
    for target in (f"{out}/", str(tmp_path / "named.sqlite"), "-"):
        done = subprocess.run(
            [SAFEHOLD, "backup", "-o", target],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert b"[NOT_A_BACKUP]" in done.stderr and b"nothing was saved" in done.stderr
        assert done.stdout == b""  # not even a stream gets a byte
    assert backups_in(out) == []
    assert not (tmp_path / "named.sqlite").exists()


@pytest.mark.parametrize(
    "suggested",
    ["app.sqlite", "../escape.sqlite", "a/b/../../up.sqlite", "..", "", "/etc/passwd", ".x\x00y"],
)
def test_server_names_stay_inside_and_never_replace(
    liar: tuple[LyingServicer, dict[str, str]], tmp_path: Path, suggested: str
) -> None:
    servicer, env = liar
    servicer.manifest.suggested_file_name = suggested
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "app.sqlite"
    existing.write_bytes(b"an earlier backup")
    outside = sorted(tmp_path.iterdir())
    for _ in range(2):
        done = run_cli("backup", "-o", str(out), env=env)
        assert done.returncode == 0, done.stderr
    assert sorted(tmp_path.iterdir()) == outside
    assert existing.read_bytes() == b"an earlier backup"
    saved = [out / n for n in backups_in(out) if n.endswith(".sqlite") and n != "app.sqlite"]
    assert len(saved) == 2, backups_in(out)
    for path in saved:
        assert path.parent == out and not path.name.startswith(".")
        assert path.read_bytes() == servicer.data


def test_client_killed_mid_backup_leaves_nothing(
    liar: tuple[LyingServicer, dict[str, str]], tmp_path: Path
) -> None:
    servicer, env = liar
    servicer.hold = threading.Event()
    out = tmp_path / "out"
    client = subprocess.Popen([SAFEHOLD, "backup", "-o", f"{out}/"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not writing_in(client.pid, out):  # its unnamed file is open in out/
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.02)
        client.send_signal(signal.SIGKILL)
        client.wait(30)
    finally:
        client.kill()
    assert backups_in(out) == []


def writing_in(pid: int, directory: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        targets = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return False
    return any(t.startswith(f"{directory}/") for t in targets)


def test_stale_partials_of_a_killed_client_are_removed(
    liar: tuple[LyingServicer, dict[str, str]], tmp_path: Path
) -> None:
    _, env = liar
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".app.sqlite{PARTIAL_MARK}0123456789ab"
    busy = out / f".app.sqlite{PARTIAL_MARK}ba9876543210"
    foreign = out / ".app.sqlite.partial-x"
    for path in (stale, busy, foreign):
        path.write_bytes(b"half")
    with open(busy, "rb") as held:  # a backup still being written, in another process
        fcntl.flock(held, fcntl.LOCK_EX)
        done = run_cli("backup", "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and busy.exists() and foreign.exists()


def test_a_stream_is_never_sent_twice(
    liar: tuple[LyingServicer, dict[str, str]], tmp_path: Path
) -> None:
    servicer, env = liar
    servicer.fail_after_data = True
    done = subprocess.run(
        [SAFEHOLD, "backup", "-o", "-"], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 1 and b"went away" in done.stderr, done.stderr
    assert done.stdout == servicer.data and servicer.calls == 1
    # A file, which nobody has seen yet, is retried and still never half-saved.
    out = tmp_path / "out"
    assert run_cli("backup", "-o", f"{out}/", env=env).returncode == 1
    assert servicer.calls > 2 and backups_in(out) == []
