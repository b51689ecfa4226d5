"""Scheduled backups as an operator runs them: `safehold serve --schedule ... --repository ...`
against a directory and the S3-protocol server, with faults, a webhook receiver on
loopback, the metrics port, and the two repository RPCs from the Python client."""

from __future__ import annotations

import http.server
import itertools
import json
import re
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import grpc
import pyrage
import pytest
from conftest import PASSWORD
from helpers import Server, add_filler, error_reason, run_cli, sqlite_content, start_server
from s3server import S3Server
from test_refused_config import refused
from test_repository import Repo, cli, repo, s3  # noqa: F401 (fixtures reused)

from safehold.client import Client
from safehold.repository import Artefact
from safehold.v1 import backup_service_pb2 as pb

STORED = re.compile(r"scheduled backup of \S+ stored: .*?(\d+) backups in the repository")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll condition until it holds, at most timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def serve(tmp: Path, db: Path, repository: Repo, *args: str) -> Server:
    return start_server(
        tmp,
        f"sqlite:///{db}",
        PASSWORD,
        "--repository",
        repository.url,
        "--metrics-listen",
        "127.0.0.1:0",
        *args,
        env=repository.env,
    )


def metric(server: Server, name: str) -> float:
    port = re.search(r"metrics on \S+ \(port (\d+)\)", server.log())
    assert port, server.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


def runs(server: Server) -> list[int]:
    """The repository's backup count after each scheduled run, from the log."""
    return [int(n) for n in STORED.findall(server.log())]


class Webhook:
    """An HTTP receiver on 127.0.0.1 that records every JSON document POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token"

    def events(self) -> list[object]:
        return [d["event"] for d in self.received]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def test_runs_on_an_interval_with_retention_after_each_and_every_backup_restorable(
    repo: Repo,  # noqa: F811 (the fixture)
    tmp_path: Path,
    sqlite_db: Path,
) -> None:
    identity = pyrage.x25519.Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(str(identity) + "\n")
    args = ["--schedule", "2s", "--keep-last", "2"]
    if repo.s3:  # age-encrypted in S3, plain in the directory
        args += ["--recipient", str(identity.to_public())]
    expected = sqlite_content(sqlite_db)
    server = serve(tmp_path, sqlite_db, repo, *args)
    try:
        wait_for(lambda: len(runs(server)) >= 4, "four scheduled runs")
        assert metric(server, "safehold_repository_backups") == 2
        assert metric(server, "safehold_scheduled_backup_last_size_bytes") > 0
    finally:
        assert server.stop() == 0
    counts = runs(server)
    # Retention ran after each run: never more than --keep-last 2 in the repository.
    assert counts[:2] == [1, 2] and all(n == 2 for n in counts[2:]), counts
    # No overlap: each run's backup started only after the previous one was stored.
    events = re.findall(r"backup of \S+ started|scheduled backup of \S+ stored", server.log())
    pair = ["backup of app started", "scheduled backup of app stored"]
    assert events[: 2 * len(counts)] == pair * len(counts)
    kept = repo.open().backups()
    assert len(kept) == 2 and all(m.encrypted == bool(repo.s3) for m in kept)
    restorer = start_server(tmp_path, f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        for manifest in kept:
            with sqlite3.connect(sqlite_db) as conn:
                conn.execute("DELETE FROM progress")
            assert sqlite_content(sqlite_db) != expected
            result = cli(
                repo, restorer, "restore", f"{repo.url}/{manifest.name}", "--yes", "-i", str(key)
            )
            assert result.returncode == 0, result.stderr
            assert sqlite_content(sqlite_db) == expected
    finally:
        restorer.stop()


def write_backup(repository: Repo, db: Path, created_at: datetime) -> None:
    """A backup of db in the repository, as if taken at created_at."""
    repository.open().write(
        Artefact(
            engine="SQLite",
            engine_version="3",
            dump_format="DUMP_FORMAT_SQLITE_FILE",
            database_name=db.stem,
            created_at=created_at,
            safehold_version="test",
            suggested_name=f"{db.stem}-{created_at:%Y%m%dT%H%M%SZ}.sqlite",
        ),
        BytesIO(db.read_bytes()),
    )


_absent_buckets = itertools.count()


@pytest.mark.parametrize("fault", ["database", "repository"])
def test_a_failing_run_is_retried_reported_and_the_next_one_succeeds(
    fault: str,
    s3: S3Server,  # noqa: F811 (the fixture)
    tmp_path: Path,
    sqlite_db: Path,
    webhook: Webhook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = sqlite_content(sqlite_db)
    moved = tmp_path / "elsewhere.sqlite"
    if fault == "database":
        # A fresh backup, so that the first run is one period away: time to take the
        # database file away once the server has started (the engine cannot open it).
        repository = Repo(str(tmp_path / "repo"), {})
        Path(repository.url).mkdir()
        fresh = datetime.now(UTC)
        write_backup(repository, sqlite_db, fresh)
        # A restart is no missed backup: the last success starts at the newest backup.
        success_before = fresh.timestamp()
    else:  # the bucket does not exist (yet)
        bucket = f"absent-{next(_absent_buckets)}"
        success_before = 0.0
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        repository = Repo(f"s3://{bucket}/nightly", s3.env, s3, bucket)
    server = serve(
        tmp_path,
        sqlite_db,
        repository,
        "--schedule",
        "4s",
        "--notify-url",
        webhook.url,
        "--notify-on",
        "success,failure",
    )
    try:
        if fault == "database":
            sqlite_db.rename(moved)
        wait_for(lambda: "failure" in webhook.events(), "a failure webhook")
        failed_at = metric(server, "safehold_scheduled_backup_last_failure_timestamp_seconds")
        assert failed_at > 0
        last_success = metric(server, "safehold_scheduled_backup_last_success_timestamp_seconds")
        assert last_success == pytest.approx(success_before, abs=1e-3)
        failed = re.search(r"scheduled backup FAILED after (\d+) attempts", server.log())
        assert failed and int(failed.group(1)) >= 2, server.log()
        assert "scheduled backup attempt 1 failed" in server.log()
        document = webhook.received[webhook.events().index("failure")]
        assert document["error"] and document["attempts"] == int(failed.group(1))
        assert PASSWORD not in json.dumps(document)

        if fault == "database":
            moved.rename(sqlite_db)
        else:
            s3.client().create_bucket(Bucket=repository.bucket)
        wait_for(lambda: "success" in webhook.events(), "a success webhook after the fault")
        succeeded_at = metric(server, "safehold_scheduled_backup_last_success_timestamp_seconds")
        assert succeeded_at > failed_at
    finally:
        assert server.stop() == 0
    # The webhook's token never reaches the log; the database is as it was.
    assert "secret-token" not in server.log()
    assert sqlite_content(sqlite_db) == before
    assert repository.open().backups()


def test_catch_up_at_start_when_the_newest_backup_is_older_than_a_period(
    tmp_path: Path, sqlite_db: Path
) -> None:
    repository = Repo(str(tmp_path / "repo"), {})
    Path(repository.url).mkdir()
    write_backup(repository, sqlite_db, datetime.now(UTC) - timedelta(days=2))
    nightly = ("--schedule", "0 3 * * *")
    server = serve(tmp_path, sqlite_db, repository, *nightly)
    try:
        wait_for(lambda: runs(server), "the catch-up run", timeout=45)
    finally:
        assert server.stop() == 0
    assert "is older than one period: catching up" in server.log()
    assert len(repository.open().backups()) == 2

    # Now the newest backup is minutes old: the next run waits for 03:00.
    again = serve(tmp_path, sqlite_db, repository, *nightly)
    try:
        wait_for(lambda: "scheduled backups (0 3 * * *)" in again.log(), "the schedule's start")
    finally:
        assert again.stop() == 0
    assert "catching up" not in again.log()
    assert re.search(r"next at \S+T03:00:00\+00:00", again.log())
    assert len(repository.open().backups()) == 2


def test_shutdown_in_the_middle_of_a_run_leaves_no_partial_backup(
    repo: Repo,  # noqa: F811 (the fixture)
    tmp_path: Path,
    sqlite_db: Path,
) -> None:
    add_filler(sqlite_db, 150)
    server = serve(tmp_path, sqlite_db, repo, "--schedule", "1h")
    wait_for(lambda: "backup of app started" in server.log(), "the catch-up run to start")
    assert server.stop() == 0
    assert "scheduled backup stopped by shutdown; nothing was stored" in server.log()
    assert repo.open().backups() == []
    assert repo.visible() == []


def test_repository_rpcs_from_the_python_client_and_the_cli(
    tmp_path: Path, sqlite_db: Path
) -> None:
    repository = Repo(str(tmp_path / "repo"), {})
    server = serve(tmp_path, sqlite_db, repository, "--keep-last", "4")
    (tmp_path / "bare").mkdir()
    bare = start_server(tmp_path / "bare", f"sqlite:///{sqlite_db}", PASSWORD)
    try:
        with Client(server.target, PASSWORD) as client:
            made = [client.backup_now() for _ in range(5)]
            listed = list(client.repository_backups(page_size=3))
        assert [r.backups_in_repository for r in made] == [1, 2, 3, 4, 4]
        assert made[-1].pruned == 1 and made[-1].repository == repository.url
        # Newest first, over two pages, exactly the manifests in the repository.
        assert listed == repository.open().backups()
        assert [m.name for m in listed] == [r.manifest.name for r in reversed(made[1:])]

        stub = server.stub()
        page = stub.ListRepositoryBackups(
            pb.ListRepositoryBackupsRequest(page_size=3), metadata=server.metadata()
        )
        assert len(page.backups) == 3 and page.next_page_token
        rest = stub.ListRepositoryBackups(
            pb.ListRepositoryBackupsRequest(page_size=3, page_token=page.next_page_token),
            metadata=server.metadata(),
        )
        assert len(rest.backups) == 1 and not rest.next_page_token
        for method, request in (
            ("ListRepositoryBackups", pb.ListRepositoryBackupsRequest()),
            ("CreateRepositoryBackup", pb.CreateRepositoryBackupRequest()),
        ):
            with pytest.raises(grpc.RpcError) as wrong:
                getattr(stub, method)(request, metadata=server.metadata("wrong"))
            assert error_reason(wrong.value)[:2] == (
                grpc.StatusCode.UNAUTHENTICATED,
                "UNAUTHENTICATED",
            )
            with pytest.raises(grpc.RpcError) as none:
                getattr(bare.stub(), method)(request, metadata=bare.metadata())
            assert error_reason(none.value)[:2] == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "NO_REPOSITORY",
            )
        with pytest.raises(grpc.RpcError) as bad_token:
            stub.ListRepositoryBackups(
                pb.ListRepositoryBackupsRequest(page_token="not-a-token"),
                metadata=server.metadata(),
            )
        assert error_reason(bad_token.value)[0] == grpc.StatusCode.INVALID_ARGUMENT

        now = run_cli("backup", "--now", env=server.client_env())
        assert now.returncode == 0, now.stderr
        assert f"saved by the server to {repository.url}/app-" in now.stdout
        shown = run_cli("list", "--json", env=server.client_env())
        assert shown.returncode == 0, shown.stderr
        names = [b["name"] for b in json.loads(shown.stdout)]
        assert names == [m.name for m in repository.open().backups()] and len(names) == 4
    finally:
        server.stop()
        bare.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "0 3 * *"], "is neither a five-field cron expression"),
        (["--schedule", "90x"], "is neither a five-field cron expression"),
        (["--schedule", "1h", "--schedule-timezone", "Mars/Olympus"], "no known time zone"),
        (["--notify-on", "sometimes"], "--notify-on takes success, failure"),
        (["--notify-url", "file:///etc/passwd"], "--notify-url must be an http"),
        (["--recipient", "age1bogus"], "not a valid age recipient"),
    ],
)
def test_a_schedule_that_cannot_work_is_refused_at_start(
    tmp_path: Path, args: list[str], message: str
) -> None:
    line = refused(tmp_path, "--repository", str(tmp_path / "repo"), *args)
    assert "cannot start: " in line and message in line


def test_a_schedule_without_repository_or_with_a_bad_policy_is_refused(tmp_path: Path) -> None:
    assert "--schedule needs --repository" in refused(tmp_path, "--schedule", "0 3 * * *")
    env = {"SAFEHOLD_REPOSITORY": str(tmp_path / "repo"), "SAFEHOLD_KEEP_DAILY": "seven"}
    assert "--keep-* take whole numbers" in refused(tmp_path, env=env)


def test_backup_now_into_an_unreachable_repository_says_so(
    s3: S3Server,  # noqa: F811 (the fixture)
    tmp_path: Path,
    sqlite_db: Path,
) -> None:
    repository = Repo("s3://no-such-bucket/nightly", s3.env, s3, "no-such-bucket")
    server = serve(tmp_path, sqlite_db, repository)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            server.stub().CreateRepositoryBackup(
                pb.CreateRepositoryBackupRequest(), metadata=server.metadata()
            )
        code, reason, _ = error_reason(failed.value)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REPOSITORY_FAILED")
        assert "no-such-bucket" in (failed.value.details() or "")
        now = run_cli("backup", "--now", env={**server.client_env(), **s3.env})
    finally:
        server.stop()
    assert now.returncode == 1 and "REPOSITORY_FAILED" in now.stderr
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in now.stderr + server.log()


def test_runs_asked_for_and_scheduled_never_overlap(tmp_path: Path, sqlite_db: Path) -> None:
    add_filler(sqlite_db, 20)  # long enough for runs to meet
    repository = Repo(str(tmp_path / "repo"), {})
    server = serve(tmp_path, sqlite_db, repository, "--schedule", "1s")
    results: list[int] = []

    def ask() -> None:
        with Client(server.target, PASSWORD) as client:
            results.extend(client.backup_now().backups_in_repository for _ in range(2))

    try:
        callers = [threading.Thread(target=ask) for _ in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(120)
        wait_for(lambda: len(runs(server)) >= 2, "two scheduled runs")
    finally:
        assert server.stop() == 0
    assert len(results) == 6
    events = re.findall(
        r"backup of app started|(scheduled|requested) backup of app stored", server.log()
    )
    # Strictly one run at a time: every start is followed by its run's end.
    assert events[0::2] == [""] * (len(events) // 2 + len(events) % 2), server.log()
    assert all(kind for kind in events[1::2])
    assert {"scheduled", "requested"} <= set(events[1::2])
    assert len(repository.open().backups()) == len(events) // 2
