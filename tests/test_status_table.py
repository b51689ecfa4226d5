"""README's status table, the rows no ordinary mistake reaches: each is forced
here by fault injection, and the database is compared afterwards.

The server is held inside the phase a fault needs with barriers the test
controls, never with a clock: a backup stream the test stops reading holds
the backup/restore gate (flow control stalls it), and an open SQLite read
transaction keeps the database from being written.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import PASSWORD, PgDatabase, make_sqlite_db
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from helpers import (
    Server,
    add_filler,
    error_reason,
    frames,
    raw_restore,
    sqlite_content,
    start_server,
)

from safehold.client import Client
from safehold.contract import PRE_RESTORE_PATH_KEY, SERVICE_NAME
from safehold.server.spool import SPOOL_PREFIX
from safehold.v1 import backup_service_pb2 as pb
from safehold.v1 import backup_service_pb2_grpc as pb_grpc


def pre_restore_path_of(err: grpc.RpcError) -> Path:
    """The pre-restore backup a failed restore names in its ErrorInfo."""
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return Path(info.metadata[PRE_RESTORE_PATH_KEY])
    raise AssertionError(f"no ErrorInfo in {status}")


def held_backup(server: Server, channel: grpc.Channel) -> grpc.Future:  # type: ignore[type-arg]
    """A backup that has started and that the test stops reading: flow control
    stalls it, so it holds the server's backup/restore gate until cancelled."""
    call = pb_grpc.BackupServiceStub(channel).Backup(pb.BackupRequest(), metadata=server.metadata())
    assert next(iter(call)).WhichOneof("frame") == "manifest"
    return call  # type: ignore[return-value]


def restore_until_phase(
    server: Server, upload: list[pb.RestoreRequest], phase: pb.RestorePhase.ValueType
) -> tuple[Iterator[pb.RestoreResponse], grpc.Channel]:
    """Start a restore and read its responses up to the start of phase."""
    channel = server.channel()
    responses = iter(
        pb_grpc.BackupServiceStub(channel).Restore(iter(upload), metadata=server.metadata())
    )
    for response in responses:
        if response.progress.phase == phase:
            return responses, channel
    raise AssertionError(f"the restore never reached {pb.RestorePhase.Name(phase)}")


@pytest.mark.parametrize("putting_back_fails", [False, True], ids=["put-back", "rollback-failed"])
def test_restore_failing_part_way_puts_the_pre_restore_backup_back_or_says_it_could_not(
    putting_back_fails: bool, tmp_path: Path
) -> None:
    db = make_sqlite_db(tmp_path / "app.sqlite")
    add_filler(db, 20)  # big enough that an unread backup stream stalls
    server = start_server(tmp_path, f"sqlite:///{db}", PASSWORD, "--lock-timeout", "5")
    try:
        new = make_sqlite_db(tmp_path / "new.sqlite")
        with sqlite3.connect(new) as conn:
            conn.execute("UPDATE games SET title = 'from the backup'")
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO games (title) VALUES ('only in the live database')")
        old = sqlite_content(db)

        backup_channel = server.channel()
        backup = held_backup(server, backup_channel)
        responses, channel = restore_until_phase(
            server, frames(new.read_bytes()), pb.RESTORE_PHASE_RESTORING
        )
        # The restore waits at the gate for the held backup. Its upload goes
        # away under it, so the replace fails with an error no engine expects.
        (spool,) = (server.data_dir / "spool").glob(f"{SPOOL_PREFIX}*")
        spool.unlink()
        reader = sqlite3.connect(db, isolation_level=None)
        if putting_back_fails:  # a read transaction: the put-back cannot write
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM games").fetchall()
        backup.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(responses)
        reader.close()
        channel.close()
        backup_channel.close()

        pre_restore = pre_restore_path_of(info.value)
        assert sqlite_content(pre_restore) == old
        if putting_back_fails:
            assert error_reason(info.value) == (
                grpc.StatusCode.INTERNAL,
                "ROLLBACK_FAILED",
                "UNKNOWN",
            )
        else:
            assert error_reason(info.value) == (
                grpc.StatusCode.ABORTED,
                "RESTORE_FAILED",
                "RESTORED_FROM_PRE_RESTORE_BACKUP",
            )
        assert sqlite_content(db) == old
    finally:
        server.stop()


def test_health_turns_not_serving_when_shutdown_begins(
    sqlite_server: Server, sqlite_db: Path
) -> None:
    add_filler(sqlite_db, 20)
    with sqlite_server.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        statuses = iter(watch)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        held_backup(sqlite_server, channel)  # keeps the server in its grace period
        sqlite_server.process.send_signal(signal.SIGTERM)
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert sqlite_server.stop() == 0


def test_database_gone_away_is_unavailable_and_untouched(
    pg_server: Server, pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);")
    with Client(pg_server.target, PASSWORD) as client:
        archive = client.backup(tmp_path / "a.dump").path
    pg_db.execute("INSERT INTO t VALUES (3)")
    with pg_db.cluster.connect() as admin:
        admin.execute(f'ALTER DATABASE "{pg_db.name}" WITH ALLOW_CONNECTIONS false')
    try:
        _, err = raw_restore(pg_server, frames(archive.read_bytes()))
        assert err is not None
        assert error_reason(err) == (
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
            "UNCHANGED",
        )
    finally:
        with pg_db.cluster.connect() as admin:
            admin.execute(f'ALTER DATABASE "{pg_db.name}" WITH ALLOW_CONNECTIONS true')
    with pg_db.connect() as db:
        assert db.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,), (3,)]


def fail_after_running(tool: str, bin_dir: Path) -> Path:
    """A `tool` for the front of the server's PATH. Asked for the restore script
    (not --list, --version, or the inspection's --section and --use-list reads),
    it writes the real tool's whole script at once, closes its output, says so in
    bin_dir/written, waits for bin_dir/release and then exits 1: a tool that fails
    after writing everything, held at the moment in between as long as the test wants."""
    real = shutil.which(tool)
    assert real is not None
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / tool
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --list "*|*" -l "*|*" --version "*|*" -V "*|*" --section="*'
        '|*" --use-list="*)\n'
        f'    exec "{real}" "$@";;\n'
        "esac\n"
        "script=$(mktemp) || exit 1\n"
        f'"{real}" "$@" > "$script" || exit $?\n'
        'cat "$script"; rm -f "$script"\n'
        "exec >&-\n"
        f'touch "{bin_dir}/written"\n'
        "n=0\n"
        f'while [ ! -e "{bin_dir}/release" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\n'
        "exit 1\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def children_named(pid: int, name: str) -> list[int]:
    return [
        int(proc.name)
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit()
        and _read(proc / "comm").strip() == name
        and _read(proc / "stat").rsplit(")", 1)[-1].split()[1] == str(pid)
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def wait_until_blocked_reading_a_pipe(pid: int, seconds: float = 60) -> None:
    """Wait until process pid sleeps in a read of an empty pipe, twice in a row:
    psql does so only once it has run every statement it was sent."""
    deadline = time.monotonic() + seconds
    streak = 0
    while streak < 2:
        assert time.monotonic() < deadline, (
            f"psql never waited for input: {_read(Path(f'/proc/{pid}/wchan'))}"
        )
        streak = streak + 1 if "pipe" in _read(Path(f"/proc/{pid}/wchan")) else 0
        time.sleep(0.1)


def test_pg_restore_failing_after_its_commit_changes_nothing(
    tmp_path: Path, pg_db: PgDatabase
) -> None:
    """pg_restore writes its own COMMIT at the end of the script and then fails.
    The test holds it between the two until psql has run all it was given: had
    safehold passed that COMMIT on while streaming, psql would have run it."""
    pg_db.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 5000);")
    archive = pg_db.cluster.dump(pg_db.name, tmp_path / "a.dump", "--format=custom")
    pg_db.execute("DELETE FROM t WHERE x > 10")
    bin_dir = fail_after_running("pg_restore", tmp_path / "bin")
    server = start_server(
        tmp_path,
        pg_db.url,
        PASSWORD,
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    try:
        outcome: list[grpc.RpcError | None] = []
        runner = threading.Thread(
            target=lambda: outcome.append(raw_restore(server, frames(archive.read_bytes()))[1])
        )
        runner.start()
        deadline = time.monotonic() + 60
        while not (bin_dir / "written").exists():
            assert time.monotonic() < deadline and runner.is_alive(), server.log()
            time.sleep(0.05)
        (psql,) = children_named(server.process.pid, "psql")
        wait_until_blocked_reading_a_pipe(psql)
        (bin_dir / "release").touch()
        runner.join(60)
    finally:
        server.stop()
    (err,) = outcome
    assert err is not None
    assert error_reason(err) == (grpc.StatusCode.ABORTED, "RESTORE_FAILED", "UNCHANGED")
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*) FROM t").fetchone() == (10,)
